"""`jobcast submit`'s stages: which `--param` goes to which stage, values typed by the operation's
params struct (a list from `a,b`), and unknown operations or params refused before any upload."""

from __future__ import annotations

from typing import Annotated

import httpx
import msgspec
import pytest
from msgspec import inspect as mi

from jobcast.cli import build_parser
from jobcast.client import ClientError
from jobcast.stages import resolve, typed_value
from tests.conftest import MEDIA, ApiServer


def stages_of(*argv: str) -> list[tuple[str, dict[str, object]]]:
    """The stages `jobcast submit talk.mp3 ARGV` would submit."""
    return resolve(build_parser().parse_args(["submit", "talk.mp3", *argv]).stages)


def test_each_param_goes_to_the_stage_it_follows() -> None:
    assert stages_of("--op", "generate_srt", "--param", "beam_size=1", "--param", "language=en") == [
        ("generate_srt", {"beam_size": 1, "language": "en"})
    ]
    argv = ["--param", "vad_filter=true", "--op", "generate_srt", "--then", "fix_srt", "--param", "chunk_size=30",
            "--then", "fix_srt", "--param", "sys_msg=Fix 1984's typos", "--param", "model=123"]  # fmt: skip
    assert stages_of(*argv) == [
        ("generate_srt", {"vad_filter": True}),  # given before --op: the first stage's
        ("fix_srt", {"chunk_size": 30}),
        ("fix_srt", {"sys_msg": "Fix 1984's typos", "model": "123"}),  # text stays text, digits too
    ]


def test_a_list_param_takes_comma_separated_values_or_json() -> None:
    codes = mi.type_info(
        Annotated[list[Annotated[str, msgspec.Meta(pattern="^[a-z]{2}$")]], msgspec.Meta(min_length=1)]
    )
    assert typed_value("de,fr", codes) == ["de", "fr"]
    assert typed_value(" de , fr ,", codes) == ["de", "fr"]
    assert typed_value("de", codes) == ["de"]
    assert typed_value('["de", "pt-BR"]', codes) == ["de", "pt-BR"]
    assert typed_value("1,2", mi.type_info(list[int] | None)) == [1, 2]
    assert typed_value("0.5", mi.type_info(float)) == 0.5
    assert typed_value("null", mi.type_info(int | None)) is None
    assert typed_value("true", mi.type_info(str)) == "true"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--op", "transcode"], "unknown operation 'transcode'; known operations: convert, "),
        (["--op", "noop"], "unknown operation 'noop'"),  # takes no file
        (["--op", "generate_srt", "--then", "fix_srt", "--param", "beam_size=2"],
         "stage 2 (fix_srt) has no param 'beam_size'; its params: base_url, chunk_size, "),
        (["--op", "generate_srt", "--param", "beam_size=wide"], "generate_srt: Expected `int`, got `str` - at `$.beam_size`"),
        (["--op", "generate_srt", "--param", "beam_size"], "--param expects key=value, got 'beam_size'"),
        ([], "give the operation with --op"),
    ],
)  # fmt: skip
def test_unknown_operations_and_params_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ClientError) as refused:
        stages_of(*argv)
    assert str(refused.value).startswith(message), refused.value


def test_then_needs_an_op_first_and_op_is_given_once(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--then", "fix_srt"], "--then adds a stage after the one --op starts; give --op first"),
        (["--op", "generate_srt", "--op", "fix_srt"], "--op starts the first stage; give each further stage with --then"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["submit", "talk.mp3", *argv])
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


async def test_a_refused_param_uploads_nothing(api: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["submit", str(MEDIA / "jfk.flac"), "--op", "generate_srt", "--then", "fix_srt", "--param",
            "chunk_size=0", "--server", api.url]  # fmt: skip
    args = build_parser().parse_args(argv)
    assert args.func(args) == 1  # the command as `jobcast` runs it, without its logging set-up
    assert "jobcast: stage 2 (fix_srt): Expected `int` >= 1 - at `$.chunk_size`" in capsys.readouterr().err
    async with httpx.AsyncClient(base_url=api.url) as client:
        files = (await client.get("/api/v1/files")).json()
    assert files["items"] == [], files
