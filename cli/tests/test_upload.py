"""The streamed multipart body of ``models register`` (the registry's side of it is in
``tests/test_register_upload.py``)."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from edgeloop.cli.upload import CHUNK_SIZE, FileChanged, FilePart, MultipartFiles


def test_the_body_is_a_multipart_form_of_the_fields_and_files_with_its_exact_length(
    tmp_path: Path,
) -> None:
    model = tmp_path / 'a "model".onnx'
    model.write_bytes(bytes(range(256)) * (CHUNK_SIZE // 128 + 3))  # several chunks
    suite = tmp_path / "suite.npz"
    suite.write_bytes(b"\r\n--not-a-boundary\r\n")
    sent: list[int] = []
    body = MultipartFiles(
        {"version": "3", "tags": '{"team": "édge"}'},
        [FilePart("model", model), FilePart("suite", suite)],
        on_progress=lambda _field, n: sent.append(n),
    )
    data = b"".join(body)
    assert body.headers["Content-Length"] == str(len(data))
    assert sent == sorted(sent)
    assert sent[-1] == len(data)

    head = f"Content-Type: {body.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=policy.HTTP).parsebytes(head + data)
    parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
    assert parts["version"].get_content() == "3"
    assert parts["tags"].get_payload(decode=True).decode() == '{"team": "édge"}'
    assert parts["model"].get_payload(decode=True) == model.read_bytes()
    assert parts["model"].get_filename() == "a %22model%22.onnx"
    assert parts["suite"].get_payload(decode=True) == suite.read_bytes()


@pytest.mark.parametrize(("size", "how"), [(10, "shrank"), (2000, "grew")])
def test_a_file_that_changes_size_while_it_is_sent_is_an_error_not_another_model(
    tmp_path: Path, size: int, how: str
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x" * 1000)
    body = MultipartFiles({}, [FilePart("model", model)])
    model.write_bytes(b"x" * size)
    with pytest.raises(FileChanged, match=f"{how} while it was being sent"):
        b"".join(body)
