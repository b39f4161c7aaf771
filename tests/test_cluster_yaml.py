"""cluster.yaml is a valid Ray cluster-launcher file (schema shipped in the ray package)."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _schema():
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_passes_ray_schema_validation(cluster):
    from ray.autoscaler._private.util import validate_config

    validate_config(cluster)  # raises on any schema violation


def test_cluster_yaml_shape(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"]["CPU"] == 0  # nothing heavy on the head
    assert "gpu_worker" in types and "cpu_worker" in types
    assert any("raycache[vllm]" in cmd for cmd in cluster["setup_commands"])


def test_schema_rejects_a_broken_file(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())
