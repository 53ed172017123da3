"""`edgeseek chat` in a real terminal (tmux): the prompt, a streamed reply, Ctrl+C stopping a reply
while the chat goes on, a slash command, leaving with /bye."""
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


def _tmux(*args):
    return subprocess.run(["tmux", *args], capture_output=True, text=True)


def _screen(session):
    return _tmux("capture-pane", "-p", "-t", session, "-S", "-200").stdout


def _wait_for(session, predicate, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        text = _screen(session)
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out; the terminal shows:\n{_screen(session)}")


def test_chat_in_a_terminal_with_ctrl_c(smollm2_path):
    session = f"edgeseek-{uuid.uuid4().hex[:8]}"
    exe = Path(sys.executable).parent / "edgeseek"
    cmd = f"{exe} chat {smollm2_path} --temp 0 -n 400; echo EXITED $?; sleep 30"
    assert _tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "50", cmd).returncode == 0
    try:
        _wait_for(session, lambda s: "loaded in" in s and s.rstrip().endswith(">>>"))
        _tmux("send-keys", "-t", session, "Write a very long story about a dragon who learns to bake bread.", "Enter")
        # the reply streams: wait for some of it, then stop it
        _wait_for(session, lambda s: len(s.split("bread.", 1)[-1].strip()) > 40)
        _tmux("send-keys", "-t", session, "C-c")
        screen = _wait_for(session, lambda s: "[stopped]" in s)
        assert "EXITED" not in screen  # Ctrl+C stopped the reply, not the chat
        _wait_for(session, lambda s: s.rstrip().endswith(">>>"))
        _tmux("send-keys", "-t", session, "What is 2+2? Answer with a number.", "Enter")
        _wait_for(session, lambda s: s.count("t/s") >= 1 and s.rstrip().endswith(">>>"), timeout=90)
        _tmux("send-keys", "-t", session, "/stats", "Enter")
        _wait_for(session, lambda s: s.count("generation:") >= 2)
        _tmux("send-keys", "-t", session, "/bye", "Enter")
        screen = _wait_for(session, lambda s: "EXITED" in s)
        assert "EXITED 0" in screen
        assert "Traceback" not in screen
    finally:
        _tmux("kill-session", "-t", session)
