"""Where the model cache lives, and the Ray client's one-line errors (no model is loaded here)."""

from pathlib import Path

import pytest

from klstore.core import models
from klstore.errors import KlstoreError


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"KLSTORE_CACHE": "/k", "XDG_CACHE_HOME": "/x"}, "/k"),
        ({"XDG_CACHE_HOME": "/x"}, "/x/klstore"),
        ({}, str(Path.home() / ".cache" / "klstore")),
    ],
)
def test_cache_dir_honours_klstore_cache_then_xdg(monkeypatch, env, expected):
    for key in ("KLSTORE_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert str(models.cache_dir()) == expected


def test_file_hash_is_by_content_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("KLSTORE_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.gguf", tmp_path / "copy" / "b.gguf"
    b.parent.mkdir()
    a.write_bytes(b"same bytes" * 1000)
    b.write_bytes(b"same bytes" * 1000)
    import hashlib

    expected = hashlib.sha256(b"same bytes" * 1000).hexdigest()
    assert models.file_sha256(a) == models.file_sha256(b) == expected
    memos = list((tmp_path / "cache" / "sha256").iterdir())
    assert len(memos) == 2 and all(m.read_text() == expected for m in memos)
    src_a = models.ModelSource("a", str(a.parent), a.name)
    src_b = models.ModelSource("b", str(b.parent), b.name)
    assert models._gguf_cache_folder(src_a).name == f"sha256-{expected[:32]}"
    assert models._gguf_cache_folder(src_a) == models._gguf_cache_folder(src_b)  # another name, same content


def test_unauthenticated_cluster_gets_a_hint(monkeypatch):
    import ray

    from klstore.run import runner

    def refuse(**kwargs):
        raise ConnectionError("Unauthenticated: the request carries no valid token\nmore detail")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runner, "_check_reachable", lambda address: None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(KlstoreError) as info:
        runner.init_ray()
    message = str(info.value)
    assert message.startswith("cannot start or join Ray (127.0.0.1:6379): Unauthenticated")
    assert "set RAY_AUTH_MODE=token" in message and "\n" not in message
