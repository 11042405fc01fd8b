"""What the terminal shows: the live canvas view (`live`) and progress bars (`progress`)."""
