"""pipeline.runtime.secrets: what counts as a credential, and command lines, URLs, text and streams masked."""

import io
import sys

from pipeline.runtime import secrets
from pipeline.runtime.secrets import MASK, credential_options, is_credential_key, mask_argv, mask_json, mask_text, mask_url, masking


def test_credential_keys_are_told_by_their_words_and_the_projects_own_options_are_not():
    for key in ("key", "secret", "token", "aws_secret_access_key", "AWS_SESSION_TOKEN", "X-Amz-Signature", "X-Amz-Credential",
                "X-Amz-Security-Token", "sig", "password", "accessKeyId", "--hf-token", "client_kwargs.aws_access_key_id",
                "Authorization", "apikey"):
        assert is_credential_key(key), key
    for key in ("--image-key", "image_key", "--key-dim", "endpoint_url", "anon", "monkey", "region_name", "v", "--output"):
        assert not is_credential_key(key), key


def test_a_url_keeps_everything_but_its_user_info_and_credential_query_values():
    assert mask_url("s3://bucket/train-{000..009}.tar") == "s3://bucket/train-{000..009}.tar"
    assert mask_url("https://user:pw@host:8080/a/b.tar?token=t0k&v=2#frag") == "https://***@host:8080/a/b.tar?token=***&v=2#frag"
    presigned = "https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=AKIA%2F1&X-Amz-Date=2025&X-Amz-Signature=abc123"
    assert mask_url(presigned) == "https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=***&X-Amz-Date=2025&X-Amz-Signature=***"
    assert mask_url("s3://bucket/key@v2.tar") == "s3://bucket/key@v2.tar"  # an @ in the path is no user-info


def test_a_command_line_masks_storage_options_env_values_credential_options_and_urls():
    argv = ["featup", "submit", "--env", "AWS_SECRET_ACCESS_KEY=env-secret-1", "--env=AWS_REGION=us-west-2", "--",
            "precompute", "https://u:url-password-1@h/s-{0..1}.tar?token=url-token-1", "--output", "s3://b/x.zarr",
            "--storage-option", "secret=so-secret-1", "--storage=client_kwargs.endpoint_url=http://h:9000",
            "--image-key", "jpg", "--hf-token", "hf-token-1"]
    assert mask_argv(argv) == [
        "featup", "submit", "--env", "AWS_SECRET_ACCESS_KEY=***", "--env=AWS_REGION=***", "--", "precompute",
        "https://***@h/s-{0..1}.tar?token=***", "--output", "s3://b/x.zarr", "--storage-option", "secret=***",
        "--storage=client_kwargs.endpoint_url=***", "--image-key", "jpg", "--hf-token", "***"]
    assert mask_argv(mask_argv(argv)) == mask_argv(argv)  # masking twice changes nothing
    assert credential_options(argv) == ["--env AWS_SECRET_ACCESS_KEY=***", "--storage-option secret=***"]


def test_text_and_json_mask_urls_pairs_and_the_values_a_command_line_named():
    with masking(["featup", "precompute", "--storage-option", "key=remembered-key-1"]):
        text = ("open s3://b/x failed with remembered-key-1; {'secret': 'abc', \"token\": \"def\", 'image_key': 'jpg'} "
                "aws_secret_access_key=ghi; https://u:p@h/x?sig=jkl")
        assert mask_text(text) == ("open s3://b/x failed with ***; {'secret': '***', \"token\": \"***\", 'image_key': 'jpg'} "
                                   "aws_secret_access_key=***; https://***@h/x?sig=***")
        assert mask_text("remembered-key-10 is another word") == "remembered-key-10 is another word"
        for placeholder in ("--storage-option: expected KEY=VALUE", "pass key=<id> or token=...", "token=***:"):
            assert mask_text(placeholder) == placeholder
        report = {"store": "https://u:p@h/x.zarr", "n": 3, "reasons": {"https://h/s.tar?token=zz: cut": 1}, "ok": [True, None]}
        assert mask_json(report) == {"store": "https://***@h/x.zarr", "n": 3, "reasons": {"https://h/s.tar?token=***: cut": 1},
                                     "ok": [True, None]}
    assert mask_text("remembered-key-1") == "remembered-key-1"  # remembered only for the command


def test_masking_wraps_the_standard_streams_for_one_command_and_restores_them(capsys):
    before = sys.stdout, sys.stderr
    with masking(["featup", "x", "--env", "API_TOKEN=printed-token-123"]) as masked:
        assert masked == ["featup", "x", "--env", "API_TOKEN=***"]
        print("the token is printed-token-123")
        print("see https://user:pw@example.org/a", file=sys.stderr)
        assert sys.stdout.isatty() is before[0].isatty()  # otherwise the stream it wraps
    assert (sys.stdout, sys.stderr) == before
    out, err = capsys.readouterr()
    assert out == "the token is ***\n" and err == "see https://***@example.org/a\n"


def test_a_masked_stream_masks_each_write():
    raw = io.StringIO()
    stream = secrets.MaskedStream(raw)
    stream.write("token=abc ")
    stream.writelines(["password=def\n"])
    assert raw.getvalue() == f"token={MASK} password={MASK}\n"
    assert mask_json({"a": ("token=x", 1), "b": ["y"]}) == {"a": ("token=***", 1), "b": ["y"]}  # containers keep their type
