"""`hfemb serve`: serve a model as an OpenAI-compatible /v1/embeddings endpoint (see hfemb/serve.py)."""

from __future__ import annotations

import argparse

from hfemb.errors import ConfigError
from hfemb.modeling.dtypes import DTYPES

HELP = "serve a model as an OpenAI-compatible /v1/embeddings endpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hub id, local model folder, LoRA adapter folder or training output folder")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8080, help="port (0 = any free port)")
    parser.add_argument("--served-model-name", default=None,
                        help="name clients pass as 'model' (default: the MODEL argument)")
    parser.add_argument("--max-batch", type=int, default=256, help="most texts in one request")
    parser.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024,
                        help="larger request bodies get HTTP 413")
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds a client may stall while sending a request (then 408 and disconnected)")
    parser.add_argument("--max-connections", type=int, default=64,
                        help="connections served at once; more get 503 with Retry-After")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per text (longer texts are truncated)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--max-tokens-per-batch", type=int, default=16384, help="padded tokens per forward pass")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype (auto: bf16 on a bf16 GPU, else fp32)")
    parser.add_argument("--quantization", choices=("4bit", "8bit"), default=None, help="bitsandbytes (CUDA)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--pooling", choices=("last", "mean", "cls"), default=None)
    parser.add_argument("--padding-free", choices=("auto", "true", "false"), default="auto",
                        help="packed batches without padding for rotary decoders (default auto: where supported)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--instruction", default=None, metavar="TASK",
                       help="query prompt used for requests with input_type=query (default: the model's own)")
    group.add_argument("--no-instruction", action="store_true", help="no query prompt even for input_type=query")
    parser.add_argument("--symmetric", action="store_true", help="input_type=document gets the query prompt too")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="log each request (method, path, status)")


def run(args) -> int:
    # lazy (numpy, torch): not loaded for `hfemb serve --help`
    from hfemb.evaluation.encoders import resolve_model_path
    from hfemb.modeling.loading import load_embedding_model
    from hfemb.publishing.serve import EmbeddingService, check_port, make_server

    if args.max_batch < 1 or args.max_request_bytes < 1 or args.max_length < 2:
        raise ConfigError("--max-batch and --max-request-bytes must be >= 1, --max-length >= 2")
    if args.read_timeout <= 0 or args.max_connections < 1:
        raise ConfigError("--read-timeout must be > 0 and --max-connections >= 1")
    check_port(args.host, args.port)  # before loading the model
    model = load_embedding_model(
        resolve_model_path(args.model), pooling=args.pooling,
        query_instruction=False if args.no_instruction else args.instruction, symmetric=args.symmetric,
        torch_dtype=args.dtype, quantization=args.quantization, device=args.device,
        trust_remote_code=args.trust_remote_code, padding_free=args.padding_free)
    service = EmbeddingService(model, model_name=args.served_model_name or args.model, max_batch=args.max_batch,
                               max_length=args.max_length, batch_size=args.batch_size,
                               max_tokens_per_batch=args.max_tokens_per_batch)
    try:
        server = make_server(service, args.host, args.port, max_request_bytes=args.max_request_bytes,
                             verbose=args.verbose, read_timeout=args.read_timeout,
                             max_connections=args.max_connections)
    except OSError as exc:  # taken while the model was loading
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    host, port = server.server_address[:2]
    print(f"serving {service.model_name!r} (dim {service.dim}) on http://{host}:{port}/v1/embeddings", flush=True)
    print(f"query prompt for input_type=query: {service.prompts['query']!r}; texts without input_type are "
          "embedded as sent", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
