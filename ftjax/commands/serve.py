"""Serve models over an OpenAI-compatible HTTP API.

ftjax-serve --model=DIR --port=P [--host=127.0.0.1] [--api-key=KEY]
            [--adapter=NAME=RUN_DIR_OR_PEFT_DIR ...] [--sweep=SWEEP_DIR]

DIR is a training workdir, a Hugging Face export folder, a .gguf file, a hub id or a preset
(with --tokenizer). Repeat --model to serve several; each is addressed by its folder/file name.
--adapter and --sweep add LoRA-family adapters over the (first) --model's one copy of the base
weights, each addressed by its NAME (a sweep's arms by their arm names).
"""

from absl import flags, logging

from ftjax import cli

_MODEL = flags.DEFINE_multi_string("model", None, "Model source(s) to serve.")
_ADAPTER = flags.DEFINE_multi_string("adapter", [], "NAME=DIR: a LoRA/DoRA adapter (training run "
                                     "dir or PEFT folder) served over the first --model.")
_SWEEP = flags.DEFINE_string("sweep", None, "Serve every finished LoRA/DoRA arm of this sweep "
                             "workdir as an adapter over the first --model.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind; 0.0.0.0 exposes the server.")
_API_KEY = flags.DEFINE_string("api-key", None, "Require 'Authorization: Bearer KEY'.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "For workdirs: latest | best | STEP.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer folder for sources without one.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Decode slots (continuous) or most requests "
                                  "decoded together (static).")
_BATCHING = flags.DEFINE_enum("batching", "continuous", ["continuous", "static"],
                              "continuous: a finished row frees its slot at once; static: a batch "
                              "decodes until its last row is done.")
_WARMUP = flags.DEFINE_integer("warmup_len", 0, "Continuous batching: compile every shape a "
                               "request of up to this many tokens (prompt + new) needs before "
                               "serving, so none compiles under load (0: compile on demand).")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Larger request bodies get a 413.")
_READ_TIMEOUT = flags.DEFINE_float("read_timeout_s", 5.0, "A client silent this long mid-request "
                                   "(e.g. a body shorter than its Content-Length) gets a 400.")
flags.mark_flags_as_required(["model"])


def adapter_flags(values: list[str], sweep: str | None) -> dict[str, str]:
    """NAME -> DIR from ``--adapter=NAME=DIR`` values and a ``--sweep`` folder."""
    from ftjax.serve.models import sweep_adapters
    out = sweep_adapters(sweep) if sweep else {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise cli.FlagError(f"--adapter={value!r}: expected NAME=RUN_DIR_OR_PEFT_DIR")
        if name in out:
            raise cli.FlagError(f"--adapter={value!r}: the id {name!r} is given twice")
        out[name] = path
    return out


def main(argv):
    del argv
    from ftjax.serve.models import load_served
    from ftjax.serve.server import App, make_server

    adapters = adapter_flags(_ADAPTER.value, _SWEEP.value)
    models = [served for i, m in enumerate(_MODEL.value) for served in load_served(
        m, checkpoint=_CHECKPOINT.value, tokenizer=_TOKENIZER.value, max_batch=_MAX_BATCH.value,
        batching=_BATCHING.value, adapters=adapters if i == 0 else None,
        warmup_len=_WARMUP.value)]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise cli.FlagError(f"model ids must be distinct, got {names}")
    server = make_server(App(models, api_key=_API_KEY.value, max_body_bytes=_MAX_BODY.value),
                         _HOST.value, _PORT.value, read_timeout_s=_READ_TIMEOUT.value)
    host, port = server.server_address[:2]
    # The test harness and users read this line to find the port.
    print(f"serving {names} on http://{host}:{port}/v1", flush=True)
    logging.info("listening on %s:%s", host, port)
    server.serve_forever()


def run() -> None:
    """The ``ftjax-serve`` console script (``python -m ftjax.commands.serve``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
