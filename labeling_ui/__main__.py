"""``python -m labeling_ui [--host H] [--port P] [--dagster-url U] [--in-process]
[--allow-remote-without-auth]``."""

import argparse
import logging

from labeling_ui.launch import serve


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m labeling_ui", description="The Agile Modeling labeling app.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--dagster-url", default="http://127.0.0.1:3000", help="Dagster webserver that runs rounds")
    p.add_argument("--in-process", action="store_true", help="run rounds inside the app (no Dagster webserver)")
    p.add_argument("--allow-remote-without-auth", action="store_true",
                   help="listen beyond this machine without sign-in (a trusted network only; "
                        "else set AGILE_APP_AUTH=name:password,...)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.host, args.port, args.dagster_url, trigger="in-process" if args.in_process else None,
          allow_remote_without_auth=args.allow_remote_without_auth)


if __name__ == "__main__":
    main()
