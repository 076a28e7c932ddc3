"""Preset names come from one registry: `serve --help`, config errors, loadtest and the route
flags of the generative (LLM) preset all read it."""

from __future__ import annotations

import pytest

from sidecar.app import build_routes
from sidecar.cli import build_parser
from sidecar.config import Config, ConfigError, RouteConfig, load
from sidecar.extract.presets import PRESETS
from sidecar.loadtest.bodies import SHAPES, request_path


def test_serve_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in PRESETS:
        assert name in help_text


def test_an_unknown_preset_names_the_known_ones(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("upstream: http://127.0.0.1:9000\npreset: kserve-v9\n")
    with pytest.raises(ConfigError) as error:
        load(config, environ={})
    for name in PRESETS:
        assert name in str(error.value)


def test_loadtest_sends_to_each_presets_own_first_route():
    assert set(SHAPES) <= set(PRESETS)
    for name in SHAPES:
        template = PRESETS[name].routes[0].path
        assert request_path(name, "iris") == template.replace("{model}", "iris")


@pytest.mark.parametrize("inject_usage", [False, True])
def test_generative_routes_carry_their_flags(inject_usage):
    """The openai preset's routes are generative, and carry inject_usage; no other route does."""
    config = Config(
        upstream="http://127.0.0.1:9000",
        preset="openai",
        inject_usage=inject_usage,
        routes=(RouteConfig(name="score", path="/score", preset="kserve-v1"),),
    )
    routes = {route.name: route for route in build_routes(config)}
    assert routes["chat-completions"].generative
    assert routes["chat-completions"].inject_usage is inject_usage
    assert not routes["score"].generative
    assert not routes["score"].inject_usage
