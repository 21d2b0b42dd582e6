from dataclasses import dataclass, field
from typing import Literal, get_args

import pytest

from jobs.config import RunConfig
from rec.config_loader import ConfigError, apply_override, from_dict, load_config
from rec.rerank import METHODS, Method


@dataclass
class Inner:
    lr: float = 1e-3
    size: Literal["tiny", "base"] = "tiny"
    layers: list[int] = field(default_factory=lambda: [1, 2])
    limit: int | None = None


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  lr: 0.1\n")
    cfg = load_config(Outer, path, ["inner.size=base", "inner.layers=[4, 5]", "inner.limit=7"])
    assert cfg == Outer("run", Inner(lr=0.1, size="base", layers=[4, 5], limit=7))
    cfg = load_config(Outer, path, ["inner.limit=null", "inner.lr=1e-4"])
    assert cfg.inner.limit is None and cfg.inner.lr == pytest.approx(1e-4)


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"lrr": 1}})
    assert "inner.lrr" in str(err.value) and "'lr'" in str(err.value)
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config(RunConfig, None, ["bogus=1"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("inner.size=huge", "inner.size"),
        ("inner.lr=fast", "inner.lr"),
        ("inner.limit=2.5", "inner.limit"),
        ("inner=3", "inner"),
        ("noequals", "key.path=value"),
    ],
)
def test_bad_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, None, [override])


def test_override_into_scalar_is_rejected():
    raw = {"name": "x"}
    with pytest.raises(ConfigError, match="not a section"):
        apply_override(raw, "name.sub=1")


@pytest.mark.parametrize("name", ["smoke", "beauty", "taobao", "movielens"])
def test_shipped_configs_load(name):
    cfg = load_config(RunConfig, f"jobs/configs/{name}.yaml")
    assert cfg.data.format in ("synthetic", "amazon", "taobao", "movielens")


def test_data_config_checks_values():
    with pytest.raises(ValueError, match="data.path"):
        load_config(RunConfig, None, ["data.format=taobao"])
    with pytest.raises(ValueError, match="'csv' is not one of"):
        load_config(RunConfig, None, ["data.format=csv", "data.path=x.csv"])
    with pytest.raises(ValueError, match="min_timestamp"):
        load_config(RunConfig, None, ["data.min_timestamp=yesterday"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("rerank.method=xmr", r"rerank.method: 'xmr' is not one of \['none', 'mmr', 'dpp'\]"),
        ("rerank.similarity=jaccard", "rerank.similarity"),
        ("rerank.identity_mix=1.0", "rerank.identity_mix"),
        ("rerank.theta_max=-1", "rerank.theta_max"),
        ("rerank.n_candidates=5", r"frontier.k must be in \[1, rerank.n_candidates=5\]"),
    ],
)
def test_rerank_section_is_checked_once(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig, None, [override])


def test_one_rerank_section_for_serving_frontier_and_env():
    cfg = load_config(RunConfig, None, ["rerank.similarity=category", "rerank.theta_max=2"])
    assert (cfg.rerank.similarity, cfg.rerank.theta_max) == ("category", 2.0)
    assert list(get_args(Method)) == list(METHODS)
    for section in (cfg.serve, cfg.frontier, cfg.env):
        assert not {"rerank_method", "theta_max"} & set(vars(section))
    assert not hasattr(cfg.env, "similarity") and not hasattr(cfg.frontier, "n_candidates")
