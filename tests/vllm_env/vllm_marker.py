"""pytest plugin for the vLLM environment: registers the `vllm` marker (loaded by .ci/vllm_env.sh
with `-p vllm_marker`), until pyproject.toml's marker list carries it."""


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs vLLM (the second environment built by .ci/vllm_env.sh)")
