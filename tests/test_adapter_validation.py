"""Adapters from outside the process: malformed PEFT folders, names and paths.

Every malformed adapter is refused with an `AdapterError` (nothing else escapes
the loader), whose message names the file relative to the adapter folder, and
the field or tensor, and never a server path; the HTTP server answers it with a
400 in OpenAI's error shape. Non-finite weights, and weights or scales large
enough to overflow the step's float arithmetic, are refused at load.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from hf_files import write_peft_adapter
from serving.adapter_store import AdapterStore, StoreConfig
from slora_jax.allocator import PageAllocator
from slora_jax.adapters import AdapterError, dummy_adapter, load_peft_adapter
from slora_jax.config import ModelConfig, load_model_config
from slora_jax.pool import PoolLayout
from test_serving_setup import MC, engine_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CFG_FILE, ST_FILE = "adapter_config.json", "adapter_model.safetensors"
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid rank-2 q/v PEFT folder for MC, as (config, tensors)."""
    path = str(tmp_path_factory.mktemp("good") / "a")
    write_peft_adapter(path, dummy_adapter(MC, 2, ("q", "v"), seed=1, std=0.3), alpha=4)
    with open(os.path.join(path, CFG_FILE)) as f:
        cfg = json.load(f)
    return cfg, load_file(os.path.join(path, ST_FILE))


def write_folder(path, cfg, tensors) -> str:
    """A PEFT folder holding `cfg` (any JSON value, NaN written as NaN) and `tensors`."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CFG_FILE), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(path, ST_FILE))
    return str(path)


def assert_client_safe(msg: str, *paths) -> None:
    """No server path and no control character (a log line cannot be forged)."""
    for p in paths:
        for form in {str(p), os.path.realpath(str(p))}:
            assert form not in msg, msg
    assert not any(ord(c) < 32 or ord(c) == 127 for c in msg), repr(msg)


def refused(call, file: str, *named: str, paths=()) -> str:
    with pytest.raises(AdapterError) as ei:
        call()
    msg = str(ei.value)
    assert msg.startswith(f"{file}: "), msg
    for n in named:
        assert f"'{n}'" in msg, msg
    assert_client_safe(msg, *paths)
    return msg


# --- adapter_config.json ---------------------------------------------------------------

BAD_FIELDS = [
    ("r", "eight"), ("r", None), ("r", 0), ("r", -2), ("r", True), ("r", 2.5), ("r", [2]),
    ("lora_alpha", "sixteen"), ("lora_alpha", None), ("lora_alpha", float("nan")),
    ("lora_alpha", float("inf")), ("lora_alpha", 10 ** 400), ("lora_alpha", 1e30),
    ("lora_alpha", False),
    ("target_modules", 5), ("target_modules", [1, 2]), ("target_modules", {"q_proj": 1}),
    ("target_modules", ["q_proj", None]),
    ("use_rslora", "yes"), ("use_rslora", 1), ("use_rslora", None),
    ("peft_type", 5), ("peft_type", ["LORA"]), ("bias", ["none"]), ("bias", None),
    ("layers_to_transform", 0), ("use_dora", "false"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=lambda v: repr(v)[:20])
def test_a_bad_config_field_is_refused_by_file_and_field(tmp_path, good, field, value):
    cfg, tensors = good
    path = write_folder(tmp_path / "a", {**cfg, field: value}, tensors)
    refused(lambda: load_peft_adapter(path, MC), CFG_FILE, field, paths=[tmp_path])


@pytest.mark.parametrize("top", [[1, 2], "LORA", 8, None, True])
def test_a_config_that_is_not_a_json_object_is_refused(tmp_path, good, top):
    path = write_folder(tmp_path / "a", top, good[1])
    msg = refused(lambda: load_peft_adapter(path, MC), CFG_FILE, paths=[tmp_path])
    assert "JSON object" in msg


@pytest.mark.parametrize("blob", [b"{not json", b"\xff\xfe\x00garbage", b"[" * 100_000,
                                  b'{"r": 2, "lora_alpha": 4, "r": "x"'],
                         ids=["syntax", "not-utf8", "deep", "truncated"])
def test_an_unparsable_config_is_refused(tmp_path, good, blob):
    path = write_folder(tmp_path / "a", good[0], good[1])
    with open(os.path.join(path, CFG_FILE), "wb") as f:
        f.write(blob)
    refused(lambda: load_peft_adapter(path, MC), CFG_FILE, paths=[tmp_path])


def test_missing_files_are_named_without_the_folder(tmp_path, good):
    (tmp_path / "empty").mkdir()
    refused(lambda: load_peft_adapter(str(tmp_path / "empty"), MC), CFG_FILE, paths=[tmp_path])
    path = write_folder(tmp_path / "a", good[0], good[1])
    os.remove(os.path.join(path, ST_FILE))
    refused(lambda: load_peft_adapter(path, MC), ST_FILE, paths=[tmp_path])
    with open(os.path.join(path, ST_FILE), "wb") as f:
        f.write(b"nonsense")
    refused(lambda: load_peft_adapter(path, MC), ST_FILE, paths=[tmp_path])


def test_rank_zero_with_rank_zero_tensors_is_refused(tmp_path, good):
    cfg, tensors = good
    empty = {k: (v[:0] if ".lora_A." in k else v[:, :0]) for k, v in tensors.items()}
    path = write_folder(tmp_path / "a", {**cfg, "r": 0}, empty)
    refused(lambda: load_peft_adapter(path, MC), CFG_FILE, "r", paths=[tmp_path])


def test_messages_quote_file_content_without_control_characters(tmp_path, good):
    cfg, tensors = good
    path = write_folder(tmp_path / "a", {**cfg, "peft_type": "LORA\nINFO forged line"}, tensors)
    refused(lambda: load_peft_adapter(path, MC), CFG_FILE, "peft_type", paths=[tmp_path])
    bad = dict(tensors)
    bad["base_model.model.model.layers.0.self_attn.q_proj.lora_A\nx.weight"] = tensors[A_KEY]
    path = write_folder(tmp_path / "b", cfg, bad)
    refused(lambda: load_peft_adapter(path, MC), ST_FILE, paths=[tmp_path])


# --- adapter_model.safetensors -----------------------------------------------------------

def _with(t: np.ndarray, value) -> np.ndarray:
    t = t.copy()
    t.flat[t.size // 2] = value
    return t


BAD_TENSORS = {
    "nan-in-A": (A_KEY, lambda t: _with(t, np.nan)),
    "inf-in-B": (B_KEY, lambda t: _with(t, np.inf)),
    "minus-inf": (A_KEY, lambda t: _with(t, -np.inf)),
    "finite-times-1e25": (A_KEY, lambda t: t * np.float32(1e25)),
    "float64-1e300": (B_KEY, lambda t: t.astype(np.float64) * 1e300),
    "0-d": (A_KEY, lambda t: np.array(1.0, np.float32)),
    "1-d": (A_KEY, lambda t: t.ravel()),
    "3-d": (B_KEY, lambda t: t[None]),
    "int32": (A_KEY, lambda t: (t * 10).astype(np.int32)),
    "float16-inf": (B_KEY, lambda t: _with(t.astype(np.float16), np.inf)),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_a_bad_tensor_is_refused_by_file_and_key(tmp_path, good, case):
    key, mutate = BAD_TENSORS[case]
    cfg, tensors = good
    path = write_folder(tmp_path / "a", cfg, {**tensors, key: mutate(tensors[key])})
    refused(lambda: load_peft_adapter(path, MC), ST_FILE, key, paths=[tmp_path])


def test_the_weight_bound_is_inclusive_and_far_above_trained_weights(tmp_path, good):
    from slora_jax.adapters import MAX_ABS_WEIGHT
    cfg, tensors = good
    at = write_folder(tmp_path / "at", cfg, {**tensors, A_KEY: _with(tensors[A_KEY],
                                                                    -MAX_ABS_WEIGHT)})
    assert load_peft_adapter(at, MC).ranks == {"q": 2, "v": 2}
    over = write_folder(tmp_path / "over", cfg, {**tensors, A_KEY: _with(
        tensors[A_KEY], np.nextafter(np.float32(MAX_ABS_WEIGHT), np.float32(np.inf)))})
    refused(lambda: load_peft_adapter(over, MC), ST_FILE, A_KEY, paths=[tmp_path])


SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


@pytest.mark.parametrize("folder,mc", [
    *[(os.path.join(ROOT, "adapters", "demo", n), SMOLLM2)
      for n in ("caps", "french", "signature")],
    *[(os.path.join(HERE, "fixtures", m, "adapters", n),
       load_model_config(os.path.join(HERE, "fixtures", m, "model")))
      for m in ("tiny_mha", "tiny_gqa")
      for n in ("r16_rslora_all", "r1_o_down", "r2_qv", "r4_mlp", "r8_attn")],
], ids=lambda v: os.path.relpath(v, ROOT) if isinstance(v, str) else "")
def test_demo_and_fixture_adapters_still_load(folder, mc):
    ad = load_peft_adapter(folder, mc)
    assert ad.ranks and all(np.isfinite(s) for s in ad.scales.values())


# --- property: nothing but AdapterError escapes the loader ----------------------------------

_JSON_SCALARS = (st.none() | st.booleans() | st.integers(-10 ** 30, 10 ** 30)
                 | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
_JSON = st.recursive(_JSON_SCALARS, lambda c: st.lists(c, max_size=3)
                     | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8)
_NOT_A_LIST_OF_STR = _JSON.filter(lambda v: not (isinstance(v, (str, list)) or v is None))
_WRONG = {
    # values of each field that no loader may accept
    "r": _JSON.filter(lambda v: not (type(v) is int and v > 0)),
    "lora_alpha": st.one_of(st.none(), st.booleans(), st.text(max_size=8),
                            st.lists(_JSON_SCALARS, max_size=2),
                            st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                             10 ** 400, 1e30, -1e30])),
    "target_modules": _NOT_A_LIST_OF_STR | st.lists(_JSON_SCALARS.filter(
        lambda v: not isinstance(v, str)), min_size=1, max_size=3),
    "use_rslora": _JSON.filter(lambda v: not isinstance(v, bool)),
    "peft_type": _JSON.filter(lambda v: v != "LORA"),
    "bias": _JSON.filter(lambda v: v != "none"),
}


@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(sorted(_WRONG) + ["<top>"]), data=st.data())
def test_property_wrong_config_types_raise_adapter_error(good, field, data):
    cfg, tensors = good
    if field == "<top>":
        cfg = data.draw(_JSON.filter(lambda v: not isinstance(v, dict)), label="config")
    else:
        cfg = {**cfg, field: data.draw(_WRONG[field], label=field)}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_folder(os.path.join(tmp, "a"), cfg, tensors)
        refused(lambda: load_peft_adapter(path, MC), CFG_FILE, paths=[tmp])


@settings(max_examples=100, deadline=None)
@given(edits=st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "use_rslora",
                                              "peft_type", "bias", "use_dora",
                                              "layers_to_transform", "rank_pattern",
                                              "base_model_name_or_path"]),
                             _JSON | st.sampled_from([2, 4.0, "LORA", "none", "all-linear",
                                                      ["q_proj", "v_proj"]]),
                             min_size=1, max_size=4))
def test_property_any_json_config_loads_or_raises_adapter_error(good, edits):
    cfg, tensors = good
    with tempfile.TemporaryDirectory() as tmp:
        path = write_folder(os.path.join(tmp, "a"), {**cfg, **edits}, tensors)
        try:
            ad = load_peft_adapter(path, MC)
        except AdapterError as e:
            assert_client_safe(str(e), tmp)
        else:
            assert all(np.isfinite(s) for s in ad.scales.values())


_SHAPES = st.lists(st.integers(0, 5), max_size=3).map(tuple)
_BAD_VALUES = st.sampled_from([np.nan, np.inf, -np.inf]) | st.floats(
    min_value=2.0 ** 17, max_value=float(np.finfo(np.float32).max), width=32).flatmap(lambda v: st.sampled_from([v, -v]))


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from([A_KEY, B_KEY, A_KEY.replace("q_proj", "v_proj")]),
       how=st.sampled_from(["value", "shape", "dtype"]), data=st.data())
def test_property_bad_tensors_raise_adapter_error(good, key, how, data):
    cfg, tensors = good
    t = tensors[key]
    if how == "value":
        t = _with(t, data.draw(_BAD_VALUES, label="value"))
    elif how == "shape":
        shape = data.draw(_SHAPES.filter(lambda s: s != t.shape), label="shape")
        t = np.full(shape, 0.1, data.draw(st.sampled_from([np.float32, np.float64, np.float16])))
    else:
        t = t.astype(data.draw(st.sampled_from([np.int8, np.int64, np.uint8, np.bool_])))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_folder(os.path.join(tmp, "a"), cfg, {**tensors, key: t})
        refused(lambda: load_peft_adapter(path, MC), ST_FILE, paths=[tmp])


# --- adapters built in code ------------------------------------------------------------------

def make_store(root=None) -> AdapterStore:
    ec = engine_config(num_pages=160)
    roots = (str(root),) if root is not None else ()
    return AdapterStore(MC, PoolLayout.create(MC, ec), PageAllocator(ec.num_pages),
                        max_rank=ec.max_rank, config=StoreConfig(allowed_roots=roots))


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e25])
def test_register_adapter_refuses_non_finite_or_overflowing_weights(value):
    ad = dummy_adapter(MC, 2, ("q", "v"), name="mem")
    a_t, b = ad.weights[1]["v"]
    ad.weights[1]["v"] = (a_t, _with(b, value))
    with pytest.raises(AdapterError, match=r"'mem'.*layer 1.*v_proj"):
        make_store().register_adapter(ad)


def test_register_adapter_refuses_bad_scales_modules_and_shapes():
    store = make_store()
    ad = dummy_adapter(MC, 2, ("q",), name="s")
    ad.scales["q"] = float("nan")
    with pytest.raises(AdapterError, match="'s'.*scale"):
        store.register_adapter(ad)
    ad = dummy_adapter(MC, 2, ("q",), name="m")
    ad.ranks["qq"] = 2
    with pytest.raises(AdapterError, match="'m'.*qq"):
        store.register_adapter(ad)
    ad = dummy_adapter(MC, 2, ("q",), name="shape")
    ad.weights[0]["q"] = (ad.weights[0]["q"][0][:, :5], ad.weights[0]["q"][1])
    with pytest.raises(AdapterError, match="'shape'.*layer 0.*q_proj"):
        store.register_adapter(ad)


@pytest.mark.parametrize("kw", [dict(std=1e30), dict(std=float("nan")), dict(alpha=float("inf")),
                                dict(alpha=1e30), dict(rank=0)])
def test_dummy_adapter_refuses_values_that_overflow(kw):
    kw = {"rank": 2, **kw}
    with pytest.raises(AdapterError):
        dummy_adapter(MC, modules=("q",), **kw)


# --- the store: lazy loads, names, paths -------------------------------------------------

def test_a_lazy_load_failure_tells_clients_the_file_and_the_log_the_folder(tmp_path, good,
                                                                           caplog):
    cfg, tensors = good
    folder = write_folder(tmp_path / "bad", {**cfg, "r": "eight"}, tensors)
    store = make_store()
    store.register_dir(str(tmp_path))
    e = store.lookup("bad")
    with caplog.at_level(logging.WARNING, logger="serving.adapters"):
        store.load_sync(e)
    assert e.host is None
    assert e.error.startswith("adapter 'bad' failed to load: adapter_config.json: field 'r' "), \
        e.error
    assert_client_safe(e.error, tmp_path)
    assert any(folder in r.getMessage() for r in caplog.records), caplog.text


def test_register_path_never_shows_the_resolved_path(tmp_path, good):
    cfg, tensors = good
    write_folder(tmp_path / "root" / ".store" / "real-target", {**cfg, "lora_alpha": "x"},
                 tensors)
    os.symlink(tmp_path / "root" / ".store" / "real-target", tmp_path / "root" / "link")
    store = make_store(tmp_path / "root")
    with pytest.raises(AdapterError) as ei:
        store.register_path("x", str(tmp_path / "root" / "link"))
    assert "real-target" not in str(ei.value) and ".store" not in str(ei.value)
    assert str(ei.value).startswith("adapter_config.json: field 'lora_alpha'"), str(ei.value)


@pytest.mark.parametrize("bad", ["\x00", "\n", "\r", "\x1b[31m", "\x7f"],
                         ids=["nul", "newline", "cr", "escape", "del"])
def test_lora_path_with_control_characters_is_refused(tmp_path, good, bad):
    root = tmp_path / "root"
    write_folder(root / "a", *good)
    store = make_store(root)
    with pytest.raises(AdapterError) as ei:
        store.register_path("x", str(root / "a") + bad)
    assert_client_safe(str(ei.value))
    assert "x" not in store


BAD_NAMES = ["", "a\nb", "a\rb", "a\x00b", "tab\t", "a b", " a", "a/b", "x" * 129, "-lead",
             ".hidden", "_u", "é", "a\u2028b", "a;b", "a\\b", "a%0Ab"]
GOOD_NAMES = ["lora-123", "a00", "user-0000", "caps", "r16_rslora_all", "dummy-r4-0",
              "x" * 128, "org.model:v1@2+b", "A", "9"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:20])
def test_adapter_names_outside_the_documented_set_are_refused(name):
    store = make_store()
    with pytest.raises(AdapterError, match=r"A-Za-z0-9") as ei:
        store.register_dummy(name, 2, ("q",))
    assert_client_safe(str(ei.value))
    assert store.names() == []


@pytest.mark.parametrize("name", GOOD_NAMES, ids=lambda n: n[:20])
def test_documented_names_are_accepted(name):
    store = make_store()
    store.register_dummy(name, 2, ("q",))
    assert store.names() == [name]


def test_register_path_checks_the_name_before_reading_the_folder(tmp_path, good):
    root = tmp_path / "root"
    write_folder(root / "a", {**good[0], "r": "eight"}, good[1])
    with pytest.raises(AdapterError, match="A-Za-z0-9"):
        make_store(root).register_path("bad\nname", str(root / "a"))


# --- through the HTTP server ------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, good):
    """The real app over an engine that is never started (loading an adapter needs no step)."""
    import jax.numpy as jnp

    from serving.engine import Engine
    from serving.protocol import TextCodec
    from serving.server import ServerThread, create_app
    from test_serving_setup import params
    root = tmp_path_factory.mktemp("adapters")
    eng = Engine(params(), MC, engine_config(), dtype=jnp.float32,
                 store_config=StoreConfig(allowed_roots=(str(root),)))
    srv = ServerThread(create_app(eng, TextCodec(), "tiny-gqa")).start()
    yield srv.url, root
    srv.stop()
    eng.shutdown()


@pytest.mark.parametrize("edit", [{"r": "eight"}, {"r": None}, {"lora_alpha": "sixteen"},
                                  {"target_modules": 5}, {"r": 0}, {"lora_alpha": float("nan")},
                                  "list", "nan-weight", "0-d", "huge-weight"],
                         ids=repr)
def test_http_load_lora_adapter_answers_400_without_server_paths(server, good, edit):
    import httpx
    url, root = server
    cfg, tensors = good
    tag = "".join(c for c in repr(edit) if c.isalnum())
    if edit == "list":
        cfg = [cfg]
    elif edit == "nan-weight":
        tensors = {**tensors, A_KEY: _with(tensors[A_KEY], np.nan)}
    elif edit == "0-d":
        tensors = {**tensors, A_KEY: np.array(1.0, np.float32)}
    elif edit == "huge-weight":
        tensors = {**tensors, B_KEY: tensors[B_KEY] * np.float32(1e25)}
    else:
        cfg = {**cfg, **edit}
    path = write_folder(root / tag, cfg, tensors)
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": tag, "lora_path": path},
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == "lora_path"
    assert_client_safe(err["message"], root)
    assert tag not in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


@pytest.mark.parametrize("name,path", [("x", "\x00"), ("x", "{good}\x00"), ("x", "{good}\n"),
                                       ("bad\nname", "{good}"), ("x" * 129, "{good}")],
                         ids=["nul", "nul-after", "newline-path", "newline-name", "long-name"])
def test_http_malformed_names_and_paths_are_client_errors(server, good, name, path):
    import httpx
    url, root = server
    folder = write_folder(root / "fine", *good)
    r = httpx.post(f"{url}/v1/load_lora_adapter",
                   json={"lora_name": name, "lora_path": path.format(good=folder)}, timeout=30)
    assert r.status_code in (400, 403), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert_client_safe(err["message"], root)
    assert name not in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


def test_dummy_adapters_pass_the_checks_and_differ_by_seed():
    """Dummies are made from shared noise without a scan: they must still pass it."""
    from slora_jax.adapters import check_adapter
    a, b = (dummy_adapter(MC, 4, ("q", "down"), seed=s, std=0.3) for s in (1, 2))
    check_adapter(a, MC)
    assert not np.array_equal(a.weights[0]["q"][0], b.weights[0]["q"][0])
    np.testing.assert_array_equal(a.weights[1]["down"][1],
                                  dummy_adapter(MC, 4, ("q", "down"), seed=1,
                                                std=0.3).weights[1]["down"][1])
