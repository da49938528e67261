"""When the credential reloader loads changed files (the servers that serve them: tests/integration/test_security.py)."""
from __future__ import annotations

import os

from videogen_server.metrics import Metrics
from videogen_server.transport.credentials import CredentialReloader, FilesChanging, fingerprint


class Files:
    """A file set whose load reads the file and fails when it says "bad" (ValueError), "odd" (anything
    else) or "moving" (changing while read)."""

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
        if text == "odd":
            raise RuntimeError("a bug")
        if text == "moving":
            raise FilesChanging("changed while being read")
        self.loads.append(text)


def _watched(tmp_path):
    """A token file reading "one", watched by a reloader that has loaded it."""
    path = tmp_path / "tokens"
    path.write_text("one")
    files, metrics = Files(path), Metrics()
    reloader = CredentialReloader(metrics)
    reloader.add(files, fingerprint(files.files()))
    return path, files, metrics, reloader


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"credentials": "tokens", **labels})


def test_a_change_is_loaded_once_it_has_settled(tmp_path):
    path, files, metrics, reloader = _watched(tmp_path)
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
    path, files, metrics, reloader = _watched(tmp_path)
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
    reloader.add(files, fingerprint(files.files()))

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
    reloader.add(TokenFile(path, ("fixed",), applied.append), fingerprint((path,)))
    path.unlink()
    reloader.poll()
    reloader.poll()
    assert applied == [] and _value(metrics, "videogen_credentials_reload_failing") == 1
    path.write_text("# rotated\ntwo\n")
    reloader.poll()
    reloader.poll()
    assert applied == [("fixed", "two")] and _value(metrics, "videogen_credentials_reload_failing") == 0


def test_a_change_while_the_files_are_first_read_is_loaded(tmp_path):
    """The fingerprint is the one taken before the start read them: a Secret swapped in between was
    recorded as loaded, and its files never served until the next change (review)."""
    path = tmp_path / "tokens"
    path.write_text("one")
    files = Files(path)
    before = fingerprint(files.files())
    path.write_text("two")  # (what the start read, or not: the same either way)
    reloader = CredentialReloader(Metrics())
    reloader.add(files, before)
    reloader.poll()
    reloader.poll()
    assert files.loads == ["two"]


def test_files_changing_while_read_are_waited_for_not_reported(tmp_path):
    path, files, metrics, reloader = _watched(tmp_path)
    path.write_text("moving")
    reloader.poll()
    reloader.poll()  # settled by its stat, changing as it was read
    assert _value(metrics, "videogen_credentials_reload_failing") == 0
    assert _value(metrics, "videogen_credentials_reloads_total", result="error") == 0
    reloader.poll()
    reloader.poll()  # tried again (the same stat: its reading may now agree)
    assert files.loads == []
    path.write_text("two")
    reloader.poll()
    reloader.poll()
    assert files.loads == ["two"]


def test_an_unexpected_failure_is_a_failed_load_and_the_other_sets_are_still_polled(tmp_path, caplog):
    odd, fine = tmp_path / "odd", tmp_path / "fine"
    odd.write_text("one")
    fine.write_text("one")
    first, second, metrics = Files(odd), Files(fine), Metrics()
    second.kind = "tls"
    reloader = CredentialReloader(metrics)
    reloader.add(first, fingerprint(first.files()))
    reloader.add(second, fingerprint(second.files()))
    odd.write_text("odd")
    fine.write_text("two")
    reloader.poll()
    reloader.poll()
    assert second.loads == ["two"] and _value(metrics, "videogen_credentials_reload_failing") == 1
    assert metrics.registry.get_sample_value("videogen_credentials_reloads_total",
                                             {"credentials": "tls", "result": "ok"}) == 1
    assert any(r.exc_info for r in caplog.records if "cannot load" in r.getMessage())  # a bug: its traceback
