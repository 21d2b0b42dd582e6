"""jobs.pipeline's own settings. The pipeline itself runs end to end elsewhere:
tests/test_two_node.py submits it with `ray job submit` and queries the app it deployed over
HTTP (endpoint, `try it` line, answers after the job, 422); tests/test_s3_stages.py runs it
in-process on S3 and checks `pipeline.resume` / `pipeline.skip` and its quality numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import RunConfig
from rec.config_loader import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


@pytest.mark.parametrize(
    "override, needle",
    [("pipeline.skip=[train,deploy]", "deploy"), ("pipeline.serve_mode=forever", "serve_mode")],
)
def test_pipeline_config_names_bad_values(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(RunConfig, SMOKE, [override])
