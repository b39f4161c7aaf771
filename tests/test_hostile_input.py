"""Hostile input, no Ray: arbitrary bytes and column types for the readers, arbitrary unicode for
the engine, the HTTP API fuzzed from its own OpenAPI schema (key and limits on), odd prompts over
HTTP with the real encoder, and path tricks in file arguments (CLI flags, snapshot paths)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from raycache.cache import SemanticCache, StaticThreshold
from raycache.cache.persist import local_file_path
from raycache.cache.store import exact_text
from raycache.cli import run_job
from raycache.data import KINDS, DataError, read_table, write_table
from raycache.service.api import ApiSettings, EngineBackend, create_app, key_digest
from raycache.service.upstream import UpstreamClient
from tests.test_cache import DIM, HashingEncoder, TextHashEncoder

KEY = "hostile-input-key"
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "content-type": "application/json"}
LIMITS = dict(max_request_bytes=8192, max_prompt_chars=200, max_batch_prompts=4)
PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# characters that have broken text handling elsewhere: NUL, lone surrogates, bidi overrides,
# zero-width and joiner marks, BOM, combining marks, astral emoji, tag characters, case-folding
# and compatibility forms, CRLF
ODD = ["\x00", "\ud800", "\udfff", "\u202e", "\u200b", "\u200d", "\ufeff", "\u0301", "😀",
       "👩\u200d👩\u200d👧", "\U000e0041", "İ", "ß", "ﬁ", "\u3000", "\r\n", "\t", "Ω", "\u2126"]
odd_text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(ODD)), max_size=5).map("".join)


# ============================================================================ readers
@pytest.fixture(scope="module")
def prop_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def _only_data_errors(path: Path, kind: str) -> None:
    """Reading ``path`` gives a non-empty frame or a DataError naming the file, nothing else."""
    for skip in (False, True):
        try:
            df = read_table(path, kind, skip_invalid=skip)
        except DataError as exc:
            assert path.name in str(exc)
            continue
        assert isinstance(df, pd.DataFrame) and len(df) > 0


def _framed(name: str, content: bytes, framed: bool) -> bytes:
    """Raw bytes, or the bytes inside the format's container (gzip stream, parquet magic)."""
    if not framed:
        return content
    if name.endswith(".gz"):
        return gzip.compress(content)
    if name.endswith(".parquet"):
        return b"PAR1" + content + len(content).to_bytes(4, "little") + b"PAR1"
    return content


@PROPERTY
@given(content=st.binary(max_size=300), framed=st.booleans(),
       name=st.sampled_from(["x.csv", "x.tsv", "x.json", "x.parquet", "x.jsonl.gz", "x.csv.gz"]),
       kind=st.sampled_from(sorted(KINDS)))
def test_arbitrary_bytes_in_every_format_only_raise_data_error(prop_dir, content, framed, name, kind):
    path = prop_dir / name
    path.write_bytes(_framed(name, content, framed))
    _only_data_errors(path, kind)


@PROPERTY
@given(cells=st.lists(odd_text, min_size=1, max_size=6), sep=st.sampled_from([",", "\t"]),
       kind=st.sampled_from(sorted(KINDS)))
def test_odd_unicode_cells_in_delimited_files(prop_dir, cells, sep, kind):
    """Quotes, separators, NULs and lone surrogates inside CSV/TSV cells."""
    columns = KINDS[kind].required
    lines = [sep.join(columns)] + [sep.join(f'"{c}"' if i % 2 else c for i in range(len(columns)))
                                   for c in cells]
    path = prop_dir / ("odd.tsv" if sep == "\t" else "odd.csv")
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    _only_data_errors(path, kind)


_ARROW_COLUMNS = st.sampled_from([
    pa.array([1, 2]), pa.array([1.5, float("nan")]), pa.array([b"\xff\xfe", b"x"]),
    pa.array([["a"], []]), pa.array([{"a": 1}, {"a": 2}]), pa.array([None, None], pa.null()),
    pa.array([True, False]), pa.array(["x", None]), pa.array(["", "   "]),
    pa.array(["a", "b"]).dictionary_encode(), pa.array(["a", "b"], pa.large_string()),
    pa.array([["q1", "q2"], None], pa.list_(pa.string())),
])


@PROPERTY
@given(kind=st.sampled_from(sorted(KINDS)), data=st.data())
def test_parquet_columns_of_any_type_only_raise_data_error(prop_dir, kind, data):
    columns = {name: data.draw(_ARROW_COLUMNS, label=name) for name in KINDS[kind].required}
    path = prop_dir / "typed.parquet"
    pq.write_table(pa.table(columns), path)
    _only_data_errors(path, kind)


# ============================================================================ the engine
def _valid_namespace(namespace: str) -> bool:
    return 0 < len(namespace) <= 256


namespaces = st.one_of(st.sampled_from(["a", "A", "a ", "ａ", "\x00", "\ud800", "x" * 256, "x" * 257, ""]),
                       odd_text)
histories = st.one_of(st.none(), st.lists(st.one_of(
    odd_text, st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": odd_text})),
    max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.booleans(), odd_text, namespaces, histories), max_size=25),
       index=st.sampled_from(["flat", "hnsw"]))
def test_arbitrary_unicode_never_crashes_the_engine_and_results_stay_consistent(tmp_path_factory, ops,
                                                                                index):
    """Store and look up arbitrary prompts, namespaces and histories. Only the documented
    ValueErrors (empty prompt, bad namespace) are raised; a lookup hits exactly when its scope holds
    the same prompt up to whitespace (the exact tier; distinct texts are near-orthogonal under the
    text-hash encoder), with that entry's response; a snapshot round trip keeps it all."""
    cache = SemanticCache(TextHashEncoder(), DIM, index=index, policy=StaticThreshold(0.99))
    model: dict[tuple, dict[str, str]] = {}
    for n, (is_store, prompt, namespace, history) in enumerate(ops):
        scope = (namespace, json.dumps(history or [], sort_keys=True))
        if not prompt.strip() or not _valid_namespace(namespace):
            with pytest.raises(ValueError):
                (cache.store(prompt, "r", namespace, history) if is_store
                 else cache.check(prompt, namespace, history))
            continue
        if is_store:
            cache.store(prompt, f"response {n} {prompt}", namespace, history)
            model.setdefault(scope, {})[exact_text(prompt)] = f"response {n} {prompt}"
            continue
        result = cache.check(prompt, namespace, history)
        expected = model.get(scope, {}).get(exact_text(prompt))
        assert result.hit == (expected is not None) and result.response == expected
        if result.hit:
            assert result.exact and exact_text(result.matched_prompt) == exact_text(prompt)
    assert len(cache) == sum(len(m) for m in model.values())
    path = tmp_path_factory.mktemp("snap") / "cache.npz"
    cache.save(path)
    restored = SemanticCache.load(path, TextHashEncoder(), policy=StaticThreshold(0.99))
    assert sorted((e.prompt, e.response, e.scope) for e in restored.entries) == \
        sorted((e.prompt, e.response, e.scope) for e in cache.entries)


# ============================================================================ the HTTP API
class FixedUpstream:
    """An OpenAI-compatible endpoint (httpx transport) that answers every request the same way."""

    def __init__(self) -> None:
        self.calls = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return httpx.Response(200, json={
            "id": "up", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "fixed answer"}}]})


def make_api(cache: SemanticCache, **limits) -> TestClient:
    upstream = UpstreamClient("http://upstream.test/v1", transport=httpx.MockTransport(FixedUpstream().handle))
    settings_ = ApiSettings(api_key_sha256=key_digest(KEY), **{**LIMITS, **limits})
    return TestClient(create_app(EngineBackend(cache), settings_, upstream), raise_server_exceptions=False)


_fuzz_api = make_api(SemanticCache(HashingEncoder(), DIM, policy=StaticThreshold(0.9)))
fuzz_schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzz_api.app, headers=AUTH)
fuzz_schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@fuzz_schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_fuzzing_with_key_and_limits_never_gets_a_server_error(case):
    """Valid and invalid requests from the app's own OpenAPI schema, authorised, against tight
    limits (200 chars, 4 prompts, 8 KiB): every answer is < 500 with a JSON error body."""
    response = case.call(headers=AUTH)
    case.validate_response(response, checks=[not_a_server_error], headers=AUTH)
    if response.status_code >= 400:
        assert set(response.json()["error"]) >= {"message", "type", "code"}


@pytest.fixture(scope="module")
def real_api(encoder) -> TestClient:
    """The API over the real (default) encoder: the Serve embedder batches requests together, so
    one prompt the encoder cannot take would fail its whole batch."""
    return make_api(SemanticCache(encoder, encoder.dim, policy=StaticThreshold(0.9)))


ODD_PROMPTS = {
    "nul": "before\x00after", "bidi override": "\u202eevil\u202c text", "zero width": "pass\u200bword",
    "emoji zwj": "👩\u200d👩\u200d👧 family", "combining": "e\u0301te\u0301", "tag chars": "hi\U000e0041",
    "bom": "\ufeffhello", "crlf": "line1\r\nline2", "astral at the limit": "😀" * 200,
    "control chars": "".join(chr(c) for c in range(1, 32)) + "x",
}


@pytest.mark.parametrize("prompt", ODD_PROMPTS.values(), ids=ODD_PROMPTS.keys())
def test_odd_unicode_prompts_round_trip_exactly_with_the_real_encoder(real_api, prompt):
    response = f"answer for {prompt}"
    stored = real_api.post("/v1/cache/store", headers=AUTH,
                           json={"prompt": prompt, "response": response, "namespace": "odd"})
    assert stored.status_code == 200, stored.text
    found = real_api.post("/v1/cache/lookup", headers=AUTH, json={"prompt": prompt, "namespace": "odd"})
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["hit"] and body["exact"] and body["entry_id"] == stored.json()["entry_id"]
    assert body["matched_prompt"] == prompt and body["response"] == response
    other = real_api.post("/v1/cache/lookup", headers=AUTH,
                          json={"prompts": [prompt[:100] + " and more", "unrelated"], "namespace": "odd"})
    assert other.status_code == 200, other.text


def _chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


REJECTED = {
    "lone surrogate prompt": ("/v1/cache/lookup", b'{"prompt": "a\\ud800b"}', 422, "not valid unicode"),
    "lone surrogate in a batch": ("/v1/cache/lookup", b'{"prompts": ["ok", "\\udfff"]}', 422, "prompts[1]"),
    "lone surrogate response": ("/v1/cache/store", b'{"prompt": "ok", "response": "\\ud800"}', 422,
                                "response is not valid unicode"),
    "lone surrogate in chat": ("/v1/chat/completions", json.dumps({"model": "m", "messages": [
        {"role": "system", "content": "\ud800"}, {"role": "user", "content": "hi"}]}).encode(), 422,
        "cannot be forwarded"),
    "NaN in chat": ("/v1/chat/completions", _chat().replace(b"}]", b'}], "temperature": NaN', 1), 422,
                    "NaN"),
    "Infinity in chat": ("/v1/chat/completions", _chat().replace(b"}]", b'}], "top_p": -Infinity', 1),
                         422, "NaN"),
    "binary body": ("/v1/cache/lookup", b"\xff\xfe\x00\x01garbage", 400, ""),
    "invalid utf-8 in a string": ("/v1/cache/lookup", b'{"prompt": "\xc3\x28"}', 400, ""),
    "deeply nested history": ("/v1/cache/lookup", b'{"prompt": "a", "history": [' + b"[" * 3000
                              + b"]" * 3000 + b"]}", 400, ""),
    "huge number": ("/v1/cache/store", b'{"prompt": "a", "response": "b", "ttl_s": 1' + b"0" * 5000 + b"}",
                    400, ""),
    "astral chars over the limit": ("/v1/cache/lookup", json.dumps({"prompt": "😀" * 201}).encode(), 422,
                                    "201 characters; the limit is 200"),
    "unicode whitespace only": ("/v1/cache/lookup", json.dumps({"prompt": "\u3000\t\n\u2003"}).encode(),
                                422, "empty"),
    "empty batch": ("/v1/cache/lookup", b'{"prompts": []}', 422, "empty"),
    "body over the byte limit": ("/v1/cache/store", json.dumps({"prompt": "a", "response": "é" * 5000})
                                 .encode(), 413, "8192 bytes"),
    "null prompt": ("/v1/cache/store", b'{"prompt": null, "response": "x"}', 422, "prompt"),
}


@pytest.mark.parametrize("path, body, status, text", REJECTED.values(), ids=REJECTED.keys())
def test_hostile_bodies_get_a_clear_4xx_and_store_nothing(real_api, path, body, status, text):
    before = real_api.get("/v1/cache/stats", headers=AUTH).json()["stores"]
    response = real_api.post(path, content=body, headers=JSON)
    assert response.status_code == status, response.text
    assert text in response.json()["error"]["message"] and "Traceback" not in response.text
    assert real_api.get("/v1/cache/stats", headers=AUTH).json()["stores"] == before
    assert real_api.post("/v1/cache/lookup", headers=AUTH, json={"prompt": "still fine?"}).status_code == 200


# ============================================================================ path tricks
def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("make_path, problem", [
    (lambda d: str(d / "pairs\x00.jsonl"), "NUL"),
    (lambda d: "file://" + str(d / "missing.jsonl"), "no such file"),
    (lambda d: "file://remote-host" + str(d / "pairs.jsonl"), "cannot open"),
    (lambda d: "http://127.0.0.1:9/pairs.jsonl", "cannot open"),
    (lambda d: str(d / "loop"), "no such file"),
    (lambda d: str(d / "no-extension"), "cannot tell the format"),
])
def test_bad_input_paths_raise_data_error_naming_the_path(tmp_path, make_path, problem):
    write_table(pd.DataFrame({"prompt_a": ["a"], "prompt_b": ["b"]}), tmp_path / "pairs.jsonl")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "no-extension").write_text('{"prompt_a": "a", "prompt_b": "b"}\n')
    path = make_path(tmp_path)
    with pytest.raises(DataError) as info:
        read_table(path, "pairs")
    assert problem.lower() in str(info.value).lower() and str(info.value).startswith(path.split("\x00")[0])


def test_file_uri_and_dot_dot_paths_read_the_same_file(tmp_path):
    path = tmp_path / "sub" / "pairs.jsonl"
    write_table(pd.DataFrame({"prompt_a": ["a"], "prompt_b": ["b"]}), path)
    plain = read_table(path, "pairs")
    for other in ("file://" + str(path), str(tmp_path / "sub" / ".." / "sub" / "pairs.jsonl")):
        pd.testing.assert_frame_equal(read_table(other, "pairs"), plain)


def test_writing_onto_a_symlink_replaces_the_link_and_never_the_file_outside(tmp_path):
    outside, out_dir = tmp_path / "outside", tmp_path / "out"
    outside.mkdir(), out_dir.mkdir()
    protected = outside / "protected.jsonl"
    protected.write_text("keep me\n")
    (out_dir / "pairs.jsonl").symlink_to(protected)
    write_table(pd.DataFrame({"prompt_a": ["a"], "prompt_b": ["b"]}), out_dir / "pairs.jsonl")
    assert protected.read_text() == "keep me\n" and _files_under(outside) == {"protected.jsonl"}
    assert not (out_dir / "pairs.jsonl").is_symlink() and _files_under(out_dir) == {"pairs.jsonl"}
    assert len(read_table(out_dir / "pairs.jsonl", "pairs")) == 1


@pytest.mark.parametrize("relative", ["a-file/out.jsonl", "missing/../out.jsonl"])
def test_an_unwritable_output_path_is_a_data_error(tmp_path, relative):
    """An output under a file is a DataError (the CLI exits 2), not a raw OSError; 'missing/..'
    either writes ./out.jsonl or is one."""
    (tmp_path / "a-file").write_text("x")
    try:
        write_table(pd.DataFrame({"prompt": ["a"]}), str(tmp_path / relative))
    except DataError as exc:
        assert relative.split("/")[0] in str(exc)
        return
    assert relative.startswith("missing") and (tmp_path / "out.jsonl").exists()


def test_cli_bad_input_path_exits_2_with_a_message_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for pairs in ("pairs\x00.jsonl", "file:///nonexistent/pairs.jsonl", "../../../../nonexistent.jsonl"):
        assert run_job("evaluate", ["--pairs", pairs, "--out", "../../etc/raycache-eval"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("raycache evaluate: error: ") and "Traceback" not in err
    assert _files_under(tmp_path) == set() and not (tmp_path / "../../etc/raycache-eval").resolve().exists()


@pytest.mark.parametrize("target, problem", [
    ("serve\x00.yaml", "NUL byte"),
    ("s3://bucket/serve.yaml", "only local paths"),
    ("file://remote/serve.yaml", "local file"),
    ("a-file/serve.yaml", "cannot write the serve config"),
])
def test_cli_write_serve_config_path_tricks_are_clear_errors(tmp_path, monkeypatch, capsys, target, problem):
    monkeypatch.chdir(tmp_path)
    Path("a-file").write_text("x")
    assert run_job("serve", ["--write-serve-config", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raycache serve: error: ") and problem in err
    assert _files_under(tmp_path) == {"a-file"}


def test_cli_write_serve_config_file_uri_writes_at_its_path_not_under_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert run_job("serve", ["--write-serve-config", f"file://{tmp_path}/out/serve.yaml"]) == 0
    assert _files_under(tmp_path) == {"out", "out/serve.yaml"}


@pytest.mark.parametrize("path, problem", [("cache\x00.npz", "NUL byte"), ("s3://b/cache.npz", "only local"),
                                           ("file://host/cache.npz", "local file"), ("", "empty"),
                                           ("file:///tmp/x%00y.npz", "NUL byte")])
def test_snapshot_path_tricks_are_refused_before_anything_is_written(tmp_path, monkeypatch, path, problem):
    monkeypatch.chdir(tmp_path)
    cache = SemanticCache(HashingEncoder(), DIM)
    cache.store("a prompt", "a response")
    with pytest.raises(ValueError, match=problem):
        cache.save(path)
    with pytest.raises(ValueError, match=problem):
        cache.restore(path)
    assert _files_under(tmp_path) == set()


def test_snapshot_file_uri_is_the_local_file(tmp_path):
    cache = SemanticCache(HashingEncoder(), DIM)
    cache.store("a prompt", "a response")
    cache.save(f"file://{tmp_path}/c%20d.npz")
    assert _files_under(tmp_path) == {"c d.npz"}
    assert local_file_path(f"file://localhost{tmp_path}/c%20d.npz") == tmp_path / "c d.npz"
    assert len(SemanticCache.load(tmp_path / "c d.npz")) == 1
