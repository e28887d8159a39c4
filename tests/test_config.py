"""params.yaml validation: the shipped file is valid, every error names its key."""

from __future__ import annotations

import copy

import pytest
import yaml

from mambastyle.config import ConfigError, Params, load_params, parse_params, to_dict
from mambastyle.models.stylegan2 import GeneratorConfig


@pytest.fixture
def raw(repo):
    return yaml.safe_load((repo / "params.yaml").read_text())


def test_shipped_params_are_valid(repo):
    p = load_params(repo / "params.yaml")
    assert isinstance(p, Params)
    assert isinstance(p.generator.architecture, GeneratorConfig)
    assert p.generator.architecture.blur_kernel == (1, 3, 3, 1)
    assert p.storage.root == "data"


def test_round_trip_through_plain_dict(raw):
    p = parse_params(raw)
    assert parse_params(to_dict(p)) == p


def _mutate(raw, dotted, value=None, delete=False):
    data = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = data
    for k in parents:
        node = node[k]
    if delete:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    "dotted,value,message",
    [
        ("generator.architecture.resolution", 100, "must be a power of two"),
        ("generator.architecture.resolution", "64", "must be an integer"),
        ("generator.architecture.n_mlp", True, "must be an integer"),
        ("generator.architecture.blur_kernel", "1331", "must be a list"),
        ("generator.sample.noise_mode", "loud", "must be one of 'const', 'random', 'none'"),
        ("generator.sample.num", 0, "between 1 and 256"),
        ("generator.sample.truncation", None, "must not be null"),
        ("generator.latent_avg_samples", 0, "must be >= 1"),
        ("invert.num_actors", 0, "must be >= 1"),
        ("train.optimizer.lr", -1, "must be > 0"),
        ("train.use_gpu", "yes", "true or false"),
        ("prepare.split", {"train": 0.8, "val": 0.1, "test": 0.5}, "sum to 1"),
        ("ray.num_cpus", 1.5, "must be an integer"),
        ("storage.root", 3, "must be a string"),
        ("train.encoder", "restyle_psp", "not trained here"),
        ("evaluate.encoders", [], "at least one encoder"),
        ("evaluate.encoders", [{"name": "a", "uri": None}, {"name": "a", "uri": "x.pt"}], "must be unique"),
        ("evaluate.editability.strengths", [0.0], "nonzero strength"),
    ],
)
def test_bad_values_name_the_key(raw, dotted, value, message):
    with pytest.raises(ConfigError) as exc:
        parse_params(_mutate(raw, dotted, value))
    assert exc.value.key == dotted
    assert str(exc.value).startswith(f"params.yaml: {dotted}: ")
    assert message in str(exc.value)


def test_bad_list_item_is_named_with_its_index(raw):
    data = _mutate(raw, "generator.architecture.blur_kernel", [1, "x", 3, 1])
    with pytest.raises(ConfigError, match=r"blur_kernel\[1\]: must be an integer"):
        parse_params(data)


def test_unknown_key_suggests_the_right_one(raw):
    data = copy.deepcopy(raw)
    data["generator"]["architecture"]["resolutoin"] = data["generator"]["architecture"].pop("resolution")
    with pytest.raises(
        ConfigError, match=r"generator\.architecture\.resolutoin: unknown key \(did you mean 'resolution'\?\)"
    ):
        parse_params(data)


def test_missing_key_is_named(raw):
    with pytest.raises(ConfigError, match=r"invert\.batch_size: missing"):
        parse_params(_mutate(raw, "invert.batch_size", delete=True))
    with pytest.raises(ConfigError, match=r"^params.yaml: edit: missing"):
        parse_params(_mutate(raw, "edit", delete=True))


def test_section_of_wrong_type(raw):
    with pytest.raises(ConfigError, match=r"ray: must be a mapping"):
        parse_params(_mutate(raw, "ray", [1, 2]))
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_params(None)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_params(bad)


def test_ffhq_profile_is_a_complete_valid_params_file(repo):
    p = load_params(repo / "profiles" / "ffhq.yaml")
    assert p.generator.architecture.resolution == 1024 and p.train.input_size == 256
    assert p.train.encoder == "mambastyle" and p.train.pretrained.required
    assert p.storage.root.startswith("s3://")
