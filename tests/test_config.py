import tomllib

from floe_app.config import Config, load_config, parse_config, setting_specs, write_config
from floe_app.paths import resolve_paths


def test_first_run_writes_a_commented_default_file(paths):
    _, warnings = load_config(paths)
    assert warnings == []
    text = paths.config_file.read_text()
    assert "# sampling temperature" in text
    assert tomllib.loads(text)["chat"]["temperature"] == Config().chat.temperature


def test_wrong_types_and_unknown_keys_name_the_key_and_keep_defaults():
    raw = {
        "chat": {"temperature": "hot", "max_tokens": 0, "top_p": 0.5, "colour": "blue"},
        "model": {"threads": True, "context_tokens": 2048},
        "plugins": {"x": 1},
    }
    config, warnings = parse_config(raw, origin="config.toml")
    assert config.chat.temperature == Config().chat.temperature
    assert config.chat.max_tokens == Config().chat.max_tokens
    assert config.model.threads == Config().model.threads
    assert config.chat.top_p == 0.5 and config.model.context_tokens == 2048
    joined = "\n".join(warnings)
    assert "chat.temperature = 'hot' is not allowed; expected a number from 0 to 2" in joined
    assert "chat.max_tokens = 0" in joined and "model.threads = True" in joined
    assert "unknown key chat.colour" in joined and "unknown section [plugins]" in joined
    assert len(warnings) == 5
    assert all("\n" not in w for w in warnings)


def test_an_integer_is_accepted_where_a_number_is_expected():
    config, warnings = parse_config({"chat": {"temperature": 1}})
    assert warnings == [] and config.chat.temperature == 1.0
    assert isinstance(config.chat.temperature, float)


def test_unparseable_file_gives_one_warning_and_defaults(paths):
    paths.config_file.write_text("[chat\ntemperature = ")
    config, warnings = load_config(paths)
    assert config == Config()
    assert len(warnings) == 1 and "not valid TOML" in warnings[0]


def test_saving_keeps_user_comments_and_unknown_keys(paths):
    paths.config_file.write_text('# mine\n[chat]\ntemperature = 0.2  # cool\nextra = "kept"\n')
    config, _ = load_config(paths)
    config.chat.max_tokens = 99
    write_config(paths, config)
    text = paths.config_file.read_text()
    assert "# mine" in text and 'extra = "kept"' in text and "# cool" in text
    assert tomllib.loads(text)["chat"]["max_tokens"] == 99
    reloaded, warnings = load_config(paths)
    assert reloaded.chat.max_tokens == 99 and reloaded.chat.temperature == 0.2
    assert warnings == [f"{paths.config_file}: unknown key chat.extra is ignored"]


def test_saving_over_a_broken_file_keeps_a_copy_of_it(paths):
    paths.config_file.write_text("this is [not toml")
    write_config(paths, Config())
    kept = list(paths.config_dir.glob("config.toml.broken-*"))
    assert len(kept) == 1 and kept[0].read_text() == "this is [not toml"
    assert load_config(paths)[1] == []


def test_floe_home_moves_everything_under_one_folder(tmp_path):
    paths = resolve_paths({"FLOE_HOME": str(tmp_path / "p")})
    for folder in (paths.config_dir, paths.data_dir, paths.cache_dir):
        assert folder.is_relative_to(tmp_path / "p")


def test_every_default_passes_its_own_rule():
    for spec in setting_specs():
        assert spec.coerce(spec.default) == spec.default, spec.key
