"""API keys as an operator gives them: `ADAPTER_SERVE_API_KEYS` as one key, a comma-separated list or a JSON
list, and vLLM's `--api-key` flag, through a real `python -m service` process; a malformed value stops
start-up with one line naming the variable (exit status 2), not a traceback."""
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from _server import free_port
from service.cli import settings_problem
from service.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "reliability"))
from _load_process_server import ServerProcess, service_env  # noqa: E402

VARIABLE = "ADAPTER_SERVE_API_KEYS"


@pytest.mark.parametrize("value,keys", [
    ("mykey", ["mykey"]),
    (" a-key ", ["a-key"]),
    ("k1,k2, k3", ["k1", "k2", "k3"]),
    ('["k1", "k2"]', ["k1", "k2"]),
    ("[]", []),
    ("", []),
])
def test_api_keys_take_one_key_a_comma_list_or_a_json_list(monkeypatch, value, keys):
    monkeypatch.setenv(VARIABLE, value)
    assert Settings().api_keys == keys


@pytest.mark.parametrize("value,why", [
    ('["k1", ', "not a valid JSON list"),
    ('["k1", 2]', "key 2 is not a string"),
    ("k1,,k2", "key 2 is empty"),
    ("k1,", "key 2 is empty"),
    ("my key", "whitespace"),
    ('[["k1"]]', "key 1 is not a string"),
])
def test_a_malformed_value_is_one_line_naming_the_variable(monkeypatch, value, why):
    monkeypatch.setenv(VARIABLE, value)
    with pytest.raises(Exception) as info:
        Settings()
    line = settings_problem(info.value)
    assert line.startswith(f"{VARIABLE}: ") and why in line and "\n" not in line, line


class Process(ServerProcess):
    """`python -m service` on a free port with two running slots; killed on exit."""

    def __init__(self, tmp_path, args=(), **settings):
        super().__init__(tmp_path, args, max_batch_size=2, max_seq_len=256, **settings)

    def models(self, key=None) -> int:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.url}/v1/models", headers=headers, timeout=30).status_code


@pytest.mark.slow
def test_one_plain_key_in_the_variable_serves_with_that_key(tmp_path):
    with Process(tmp_path, api_keys="mykey") as server:
        assert server.models("mykey") == 200
        assert server.models() == 401 and server.models("other") == 401


@pytest.mark.slow
def test_api_key_flag_as_vllm(tmp_path):
    with Process(tmp_path, ["--api-key", "k1", "--api-key", "k2,k3"], api_keys="ignored") as server:
        assert [server.models(k) for k in ("k1", "k2", "k3", "ignored")] == [200, 200, 200, 401]


@pytest.mark.slow
@pytest.mark.parametrize("args,settings,expected", [
    ((), {"api_keys": '["k1", '}, "ADAPTER_SERVE_API_KEYS: not a valid JSON list"),
    ((), {"api_keys": "a,,b"}, "ADAPTER_SERVE_API_KEYS: key 2 is empty"),
    ((), {"key_adapters": "{oops"}, "ADAPTER_SERVE_KEY_ADAPTERS: not valid JSON"),
    ((), {"max_batch_size": "many"}, "ADAPTER_SERVE_MAX_BATCH_SIZE: "),
    ((), {"adapter_dtype": "bf16"}, "ADAPTER_SERVE_ADAPTER_DTYPE: must be one of auto, float32, bfloat16, float16"),
    (("--api-key", "a b"), {}, "--api-key: key 1 contains whitespace"),
])
def test_a_malformed_setting_stops_start_up_with_one_line(tmp_path, args, settings, expected):
    env = service_env(port=free_port(), adapter_dir=tmp_path / "store", **settings)
    done = subprocess.run([sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"adapter-serve: {expected}"), done.stderr
    assert "Traceback" not in done.stderr
