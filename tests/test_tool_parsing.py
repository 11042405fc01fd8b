"""Gemma 4 tool calls and thoughts parsed out of hand-written model outputs, whole and
streamed in every split."""

import json

import pytest

from mlx_diffusiongemma.tool_parsing import OutputParser, Parsed, ToolCall, parse_arguments, parse_output

Q = '<|"|>'


def call(name, args):
    return f"<|tool_call>call:{name}{args}<tool_call|>"


def streamed(pieces) -> tuple[Parsed, OutputParser]:
    parser, out = OutputParser(), Parsed()
    for i, piece in enumerate(pieces):
        out += parser.feed(piece, final=i == len(pieces) - 1)
    return out, parser


def every_split(text):
    """The text cut in two at every position, and in three at a few."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for i in range(0, len(text), 7):
        for j in range(i, len(text), 11):
            yield [text[:i], text[i:j], text[j:]]


def test_several_calls_with_nested_values():
    text = ("Let me look." + call("get_weather", f"{{city:{Q}Paris{Q},days:3,ratio:-1.5e2,ok:true,none:null}}")
            + call("search", f"{{query:{Q}mlx{Q},filters:{{tags:[{Q}a{Q},{Q}b{Q}],range:[1,[2,3]],deep:{{x:{{}}}}}}}}")
            + call("now", "{}"))
    parsed = parse_output(text)
    assert parsed.content == "Let me look." and parsed.reasoning == ""
    assert parsed.tool_calls == [
        ToolCall("get_weather", {"city": "Paris", "days": 3, "ratio": -150.0, "ok": True, "none": None}),
        ToolCall("search", {"query": "mlx", "filters": {"tags": ["a", "b"], "range": [1, [2, 3]], "deep": {"x": {}}}}),
        ToolCall("now", {}),
    ]
    assert json.loads(parsed.tool_calls[1].arguments_json()) == parsed.tool_calls[1].arguments


def test_strings_keep_braces_quotes_commas_and_newlines():
    tricky = 'a {b} "c" \'d\', e:f [g]\n}{ <|tool_call> \\n'
    parsed = parse_output(call("echo", f"{{text:{Q}{tricky}{Q}}}"))
    assert parsed.tool_calls == [ToolCall("echo", {"text": tricky})]
    assert parsed.content == ""


def test_json_style_keys_and_strings_are_read_too():
    assert parse_arguments('{"a": "x\\"y", b : [ 1 , "z" ] }') == {"a": 'x"y', "b": [1, "z"]}


def test_a_call_split_across_canvases_parses_the_same_in_every_split():
    text = ("<|channel>thought\nneeds {a} tool<channel|>Sure: "
            + call("get", f"{{q:{Q}x}}y{Q},n:[1,2]}}") + call("put", f"{{v:{Q}<channel|>{Q}}}") + " done")
    whole = parse_output(text)
    assert whole.reasoning == "needs {a} tool" and whole.content == "Sure:  done"
    assert [c.name for c in whole.tool_calls] == ["get", "put"]
    assert whole.tool_calls[1].arguments == {"v": "<channel|>"}
    for pieces in every_split(text):
        assert streamed(pieces)[0] == whole, pieces


@pytest.mark.parametrize("body", [
    "call:f{a:}",                       # a key without a value
    "call:f{a:1",                       # no closing brace
    f"call:f{{a:{Q}open}}",             # an unterminated string
    "call:{a:1}",                       # no name
    "call:f{a:1} trailing",             # text after the arguments
    "call:f{a:1,}",                     # a trailing comma
    "call:f{a:bareword}",               # an unquoted string value
    "notacall:f{}",
    "call:f" + "{a:" * 3000 + "1" + "}" * 3000,  # deeper than the parser recurses
])
def test_malformed_calls_stay_in_the_answer_as_text(body):
    text = f"before <|tool_call>{body}<tool_call|> after"
    parsed = parse_output(text)
    assert parsed.tool_calls == [] and parsed.content == text
    for pieces in ([text[:9], text[9:]], [text[:-7], text[-7:]]):
        assert streamed(pieces)[0] == parsed


def test_a_call_left_open_at_the_end_is_text():
    text = "ok <|tool_call>call:f{a:" + Q + "half"
    parsed, parser = streamed([text[:12], text[12:]])
    assert parsed == Parsed(content=text)


def test_a_good_call_after_a_malformed_one_still_parses():
    text = call("bad", "{x:}") + call("good", "{x:1}")
    parsed = parse_output(text)
    assert parsed.content == call("bad", "{x:}") and parsed.tool_calls == [ToolCall("good", {"x": 1})]


def test_thoughts_go_to_reasoning_and_the_label_is_dropped():
    parsed = parse_output("<|channel>thought\nstep 1, step 2<channel|>The answer is 4.")
    assert parsed == Parsed(content="The answer is 4.", reasoning="step 1, step 2")
    assert parse_output("No thoughts at all.") == Parsed(content="No thoughts at all.")


def test_markers_split_anywhere_are_held_until_settled():
    parser = OutputParser()
    assert parser.feed("Hi <|chan").content == "Hi "
    assert parser.feed("nel>thou") == Parsed()
    assert parser.feed("ght\nabc<chan") == Parsed(reasoning="abc")
    assert parser.feed("nel|>x") == Parsed(content="x")
    # A lone "<" that starts no marker is text once the output ends.
    assert parser.feed(" a <", final=False).content == " a "
    assert parser.feed("", final=True).content == "<"


def test_output_that_ends_inside_a_thought_is_flagged():
    parsed, parser = streamed(["<|channel>thought\nthinking and thinking", " and never stopping"])
    assert parsed == Parsed(reasoning="thinking and thinking and never stopping")
    assert parser.thought_unfinished
    _, finished = streamed(["<|channel>thought\nshort<channel|>", "Answer."])
    assert not finished.thought_unfinished
