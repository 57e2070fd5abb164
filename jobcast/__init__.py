"""The jobcast command line: `serve` composes the processes; `api` and `worker` run one each."""

__all__: list[str] = []
