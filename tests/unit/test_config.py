"""Job files: structure, environment variables, paths, and errors that name the key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from textwrap import dedent

import pytest

from custsync.config import SyncSettings, load_job_file, parse_duration, resolve_url
from custsync.engine import Job
from custsync.errors import ConfigError

MINIMAL = """
[source]
connector = "file"
path = "customers.jsonl"
[target]
connector = "sql"
url = "sqlite:///out.db"
table = "customers"
key = "customer_no"
[mapping]
preset = "erp_customer"
"""


def job_file(tmp_path: Path, text: str = MINIMAL, name: str = "nightly.toml") -> Path:
    path = tmp_path / name
    path.write_text(dedent(text), encoding="utf-8")
    return path


def error_of(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        load_job_file(path, env=env or {})
    return error.value


def test_the_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    assert load_job_file(job_file(tmp_path), env={}).name == "nightly"


def test_relative_sqlite_urls_resolve_against_the_job_folder(tmp_path: Path) -> None:
    config = load_job_file(job_file(tmp_path), env={})

    assert config.target.url == f"sqlite:///{tmp_path.resolve() / 'out.db'}"  # type: ignore[attr-defined]


def test_default_state_and_rejects_sit_beside_the_job_file(tmp_path: Path) -> None:
    config = load_job_file(job_file(tmp_path), env={})

    assert config.state_url == f"sqlite:///{tmp_path.resolve() / '.custsync' / 'state.db'}"
    assert config.rejects_path == tmp_path.resolve() / ".custsync" / "rejects" / "nightly.jsonl"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_other_urls_are_left_alone(url: str, expected: str) -> None:
    assert resolve_url(url, Path("/somewhere")) == expected


def test_environment_variables_and_defaults_are_read(tmp_path: Path) -> None:
    text = MINIMAL.replace('"customers.jsonl"', '"${IN_DIR}/${IN_FILE:-c.jsonl}"')

    config = load_job_file(job_file(tmp_path, text), env={"IN_DIR": "exports"})

    assert config.source.path == "exports/c.jsonl"  # type: ignore[attr-defined]


def test_an_unset_environment_variable_names_itself_and_the_key(tmp_path: Path) -> None:
    text = MINIMAL.replace('"customers.jsonl"', '"${IN_FILE}"')

    error = error_of(job_file(tmp_path, text))

    assert "IN_FILE" in str(error)
    assert error.key == "source.path"
    assert "nightly.toml" in str(error)


def test_an_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    error = error_of(job_file(tmp_path, "colour = 'blue'\n" + MINIMAL))

    assert error.key == "colour"


def test_an_unknown_key_inside_a_section_is_named(tmp_path: Path) -> None:
    error = error_of(job_file(tmp_path, MINIMAL + "[sync]\nbatchsize = 10\n"))

    assert error.key == "sync.batchsize"


def test_an_unknown_source_key_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace('path = "customers.jsonl"', 'path = "c.jsonl"\npaht = "x"')

    assert error_of(job_file(tmp_path, text)).key == "source.paht"


def test_a_missing_target_is_named(tmp_path: Path) -> None:
    text = '[source]\nconnector = "file"\npath = "c.jsonl"\n'

    assert error_of(job_file(tmp_path, text)).key == "target"


def test_a_missing_required_key_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace('path = "customers.jsonl"\n', "")

    error = error_of(job_file(tmp_path, text))

    assert error.key == "source.path"
    assert "missing" in str(error)


def test_an_unknown_connector_lists_the_installed_ones(tmp_path: Path) -> None:
    error = error_of(job_file(tmp_path, MINIMAL.replace('connector = "sql"', 'connector = "sap"')))

    assert error.key == "target.connector"
    assert "sql" in str(error)


def test_a_key_the_mapping_does_not_produce_is_an_error(tmp_path: Path) -> None:
    error = error_of(job_file(tmp_path, MINIMAL.replace('key = "customer_no"', 'key = "erp_no"')))

    assert error.key == "target.key"


def test_a_bad_mapping_path_is_an_error_before_anything_runs(tmp_path: Path) -> None:
    text = MINIMAL + '[mapping.fields]\ntier = "metadta.tier"\n'

    error = error_of(job_file(tmp_path, text))

    assert error.key == "mapping.fields.tier"


def test_mapping_fields_extend_the_preset(tmp_path: Path) -> None:
    text = MINIMAL + '[mapping.fields]\ntier = { path = "metadata.tier", default = "standard" }\n'

    config = load_job_file(job_file(tmp_path, text), env={})

    assert "tier" in config.mapping.field_names
    assert "customer_no" in config.mapping.field_names


def test_the_key_defaults_to_the_presets(tmp_path: Path) -> None:
    config = load_job_file(job_file(tmp_path, MINIMAL.replace('key = "customer_no"\n', "")), env={})

    assert config.schema_.key == ("customer_no",)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    error = error_of(job_file(tmp_path, "[source\n"))

    assert "nightly.toml" in str(error)


def test_writeback_needs_the_commercelayer_source(tmp_path: Path) -> None:
    text = MINIMAL + '[writeback]\nfield = "metadata.erp_id"\n'

    assert error_of(job_file(tmp_path, text)).key == "writeback"


def test_from_dict_takes_the_file_structure(tmp_path: Path) -> None:
    job = Job.from_dict(
        {
            "name": "nb",
            "source": {"connector": "file", "path": "c.jsonl"},
            "target": {"connector": "sql", "url": "sqlite:///nb.db", "key": "id"},
        },
        base_dir=tmp_path,
    )

    assert job.name == "nb"
    assert job.config.mapping.name == "flat_customer"
    assert job.config.schema_.key == ("id",)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("1h30m", 5400), ("90s", 90), ("2d", 172800), ("15", 15), (30, 30)],
)
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


def test_a_bad_duration_is_an_error(tmp_path: Path) -> None:
    assert error_of(job_file(tmp_path, MINIMAL + '[sync]\nlookback = "soon"\n')).key == (
        "sync.lookback"
    )


def test_commit_interval_defaults_to_five_seconds_and_takes_a_duration() -> None:
    assert SyncSettings().commit_interval == timedelta(seconds=5)
    assert SyncSettings(commit_interval="250ms").commit_interval == timedelta(milliseconds=250)
    assert SyncSettings(commit_interval=0).commit_interval == timedelta(0)


@pytest.mark.parametrize("key", ["lookback", "commit_interval"])
def test_a_negative_duration_is_an_error_naming_the_key(tmp_path: Path, key: str) -> None:
    error = error_of(job_file(tmp_path, MINIMAL + f"[sync]\n{key} = -5\n"))
    assert error.key == f"sync.{key}"
    assert "negative" in str(error)


def test_max_rejects_below_one_is_a_fraction_of_the_records_read() -> None:
    sync = SyncSettings(max_rejects=0.01)

    assert not sync.rejects_exceeded(1, 100)
    assert sync.rejects_exceeded(2, 100)


def test_max_rejects_of_one_or_more_is_a_count() -> None:
    sync = SyncSettings(max_rejects=3)

    assert not sync.rejects_exceeded(3, 10)
    assert sync.rejects_exceeded(4, 1_000_000)


def test_a_job_can_override_the_inbound_presets_date_order(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'path = "customers.jsonl"',
        'path = "customers.csv"\nmapping = "magento_customers"\ndate_order = "MDY"',
    )

    config = load_job_file(job_file(tmp_path, text), env={})

    assert config.inbound is not None
    record = config.inbound.apply_one(
        {"email": "a@b.co", "_website": "base", "updated_at": "09/01/24 12:49"}
    )
    assert record["updated_at"].month == 9


def test_date_order_without_an_inbound_mapping_is_an_error(tmp_path: Path) -> None:
    text = MINIMAL.replace('path = "customers.jsonl"', 'path = "c.jsonl"\ndate_order = "MDY"')

    assert error_of(job_file(tmp_path, text)).key == "source.date_order"
