// The chat page: streams /v1/chat/completions with the draft-event extension, so the
// current canvas is shown resolving step by step, then replaced by the committed text.
// Thoughts are folded away, tool calls shown as calls. Nothing is fetched from outside.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
// Every draft the page has shown, for anyone inspecting the page (the browser test does).
window.draftLog = [];

$("api-key").value = localStorage.getItem("apiKey") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("apiKey", $("api-key").value));
$("clear").addEventListener("click", () => { history.length = 0; $("log").textContent = ""; });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api-key").value) h.Authorization = "Bearer " + $("api-key").value;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    $("model").textContent = r.ok ? body.data[0].id : body.error.message;
  } catch (err) { $("model").textContent = String(err); }
}

function element(tag, cls, parent, text) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  if (text !== undefined) el.textContent = text;
  parent.appendChild(el);
  return el;
}

function assistantView() {
  const box = element("div", "msg assistant", $("log"));
  const thoughts = element("details", "", box);
  element("summary", "", thoughts, "thoughts");
  const reasoning = element("div", "reasoning", thoughts);
  thoughts.hidden = true;
  return {
    box, thoughts, reasoning,
    committed: element("div", "committed", box),
    calls: element("div", "calls", box),
    draft: element("div", "draft", box),
    stats: element("div", "stats", box),
  };
}

function integerField(id) {
  const v = parseInt($(id).value, 10);
  return Number.isFinite(v) && v > 0 ? v : undefined;
}

async function send() {
  const text = $("input").value;
  if (!text.trim()) return;
  $("input").value = "";
  element("div", "msg user", $("log"), text);
  history.push({ role: "user", content: text });
  const view = assistantView();
  const body = {
    model: $("model").textContent || undefined, messages: history, stream: true, stream_drafts: true,
    stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: $("thinking").checked },
    max_tokens: integerField("max-tokens"), max_denoising_steps: integerField("steps"),
  };
  // ?seed=N in the page's address makes replies reproducible.
  const seed = parseInt(new URLSearchParams(location.search).get("seed"), 10);
  if (Number.isFinite(seed)) body.seed = seed;
  $("send").disabled = true;
  const reply = { role: "assistant", content: "", tool_calls: [] };
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) throw new Error((await r.json()).error.message);
    await readEvents(r.body, (event, data) => show(view, reply, event, data));
  } catch (err) {
    element("div", "error", view.box, String(err.message || err));
  } finally {
    view.draft.textContent = "";
    $("send").disabled = false;
    if (!reply.tool_calls.length) delete reply.tool_calls;
    history.push(reply);
    $("log").scrollTop = $("log").scrollHeight;
  }
}

async function readEvents(stream, onEvent) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = null, data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;
      if (data === "[DONE]") return;
      onEvent(event, JSON.parse(data));
    }
  }
}

function show(view, reply, event, data) {
  if (data.error) throw new Error(data.error.message);
  if (event === "draft") {
    view.draft.textContent = data.draft.text;
    window.draftLog.push(data.draft.text);
  } else if (data.usage) {
    const u = data.usage;
    view.stats.textContent = `${u.prompt_tokens} prompt tokens (${u.prompt_tokens_details.cached_tokens} cached), ` +
      `${u.completion_tokens} generated`;
  } else if (data.choices && data.choices.length) {
    const choice = data.choices[0], delta = choice.delta || {};
    if (delta.reasoning_content) {
      view.thoughts.hidden = false;
      view.reasoning.textContent += delta.reasoning_content;
    }
    if (delta.content) {
      view.committed.textContent += delta.content;
      reply.content += delta.content;
      view.draft.textContent = "";
    }
    for (const call of delta.tool_calls || []) {
      reply.tool_calls.push({ id: call.id, type: "function", function: call.function });
      element("div", "tool-call", view.calls, `${call.function.name}(${call.function.arguments})`);
    }
    if (choice.finish_reason) {
      view.box.dataset.finish = choice.finish_reason;
      if (choice.thinking_unfinished) element("div", "error", view.box, "the model was still thinking when it stopped");
    }
  }
  $("log").scrollTop = $("log").scrollHeight;
}

loadModel();
