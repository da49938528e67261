"""When the credential reloader loads changed files (the servers that serve them: tests/integration/test_security.py)."""
from __future__ import annotations

import os

from videogen_server.metrics import Metrics
from videogen_server.transport.credentials import CredentialReloader


class Files:
    """A file set whose load reads the file and fails when it says "bad"."""

    kind = "tokens"

    def __init__(self, path):
        self.path = path
        self.loads: list[str] = []

    def files(self):
        return (self.path,)

    def load(self):
        text = self.path.read_text()
        if text == "bad":
            raise ValueError("no token in it")
        self.loads.append(text)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"credentials": "tokens", **labels})


def test_a_change_is_loaded_once_it_has_settled(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("one")
    files, metrics = Files(path), Metrics()
    reloader = CredentialReloader(metrics)
    reloader.add(files)
    assert _value(metrics, "videogen_credentials_reload_failing") == 0  # exported before anything happens
    assert _value(metrics, "videogen_credentials_reloads_total", result="error") == 0
    reloader.poll()
    assert files.loads == []  # unchanged: nothing read
    path.write_text("tw")  # a writer halfway...
    reloader.poll()
    assert files.loads == []  # ...not loaded at the poll that sees the change
    path.write_text("two")
    reloader.poll()
    assert files.loads == []  # changed again since: still waiting
    reloader.poll()
    assert files.loads == ["two"]  # the same for a whole interval: loaded
    reloader.poll()
    reloader.poll()
    assert files.loads == ["two"]
    assert _value(metrics, "videogen_credentials_reloads_total", result="ok") == 1


def test_a_set_that_cannot_load_is_reported_once_and_kept_until_mended(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text("one")
    files, metrics = Files(path), Metrics()
    reloader = CredentialReloader(metrics)
    reloader.add(files)
    path.write_text("bad")
    for _ in range(5):
        reloader.poll()
    assert files.loads == []
    assert _value(metrics, "videogen_credentials_reload_failing") == 1
    assert _value(metrics, "videogen_credentials_reloads_total", result="error") == 1  # not once a poll
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no token in it; still serving the ones loaded before" in warnings[0], warnings
    path.write_text("three")
    reloader.poll()
    reloader.poll()
    assert files.loads == ["three"]
    assert _value(metrics, "videogen_credentials_reload_failing") == 0


def test_files_put_back_as_they_were_loaded_end_the_failure(tmp_path):
    """A Secret rolled back (the `..data` link pointed at the folder that was loaded): nothing to load,
    and nothing failing any more."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "tokens").write_text("one")
    (tmp_path / "v2" / "tokens").write_text("bad")
    (tmp_path / "data").symlink_to("v1")
    files, metrics = Files(tmp_path / "data" / "tokens"), Metrics()
    reloader = CredentialReloader(metrics)
    reloader.add(files)

    def point(version):
        (tmp_path / "tmp").symlink_to(version)
        os.replace(tmp_path / "tmp", tmp_path / "data")

    point("v2")
    reloader.poll()
    reloader.poll()
    assert _value(metrics, "videogen_credentials_reload_failing") == 1
    point("v1")
    reloader.poll()
    reloader.poll()
    assert _value(metrics, "videogen_credentials_reload_failing") == 0 and files.loads == []
    assert _value(metrics, "videogen_credentials_reloads_total", result="ok") == 0


def test_a_token_file_that_goes_missing_keeps_the_tokens(tmp_path):
    from videogen_server.transport.credentials import TokenFile

    path = tmp_path / "tokens"
    path.write_text("one\n")
    applied, metrics = [], Metrics()
    reloader = CredentialReloader(metrics)
    reloader.add(TokenFile(path, ("fixed",), applied.append))
    path.unlink()
    reloader.poll()
    reloader.poll()
    assert applied == [] and _value(metrics, "videogen_credentials_reload_failing") == 1
    path.write_text("# rotated\ntwo\n")
    reloader.poll()
    reloader.poll()
    assert applied == [("fixed", "two")] and _value(metrics, "videogen_credentials_reload_failing") == 0
