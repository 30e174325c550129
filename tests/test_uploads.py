"""msae.uploads, what users hand the app: a refused upload leaves nothing behind. (The Home page's SAE upload is
tested through the page in test_pages.py.)"""

import pytest

from msae.uploads import UploadError, save_corpus_upload


def test_a_refused_corpus_upload_leaves_no_run_directory(tmp_path):
    for name, data in (("bad.txt", b"caf\xe9\n"), ("empty.txt", b""), ("data.bin", b"\x00\x01")):
        with pytest.raises(UploadError):
            save_corpus_upload(name, data, tmp_path / "new-run")
        assert not (tmp_path / "new-run").exists(), name
    (tmp_path / "kept").mkdir()
    with pytest.raises(UploadError):
        save_corpus_upload("bad.txt", b"caf\xe9\n", tmp_path / "kept")
    assert (tmp_path / "kept").is_dir(), "a directory that was there before stays"
