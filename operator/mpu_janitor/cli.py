"""The command line: one sweep or an inventory of a policy file, or the operator itself.

Exit codes: 0 success, 1 the sweep had failures (or could not reach the store), 2 bad input
(with a message that names the field), 130 stopped by SIGINT or SIGTERM (the summary of what
was done is printed first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TextIO

import yaml

from mpu_janitor import __version__
from mpu_janitor.fairness import FairnessLimits
from mpu_janitor.policy import (
    DEFAULT_LILT_INVENTORY_DIR,
    KIND,
    Mode,
    Policy,
    PolicyError,
    parse_policy,
)
from mpu_janitor.progress import Progress
from mpu_janitor.selector import LabelSelector, SelectorError, parse_selector
from mpu_janitor.stores import UnusableTarget, open_store
from mpu_janitor.stores.base import StoreCredentials, StoreError
from mpu_janitor.sweep import SweepResult, inventory, run_sweep
from mpu_janitor.tenancy import (
    Tenancy,
    install_redaction,
    operator_namespace,
    parse_namespaces,
    remember_environment_secrets,
)

EXIT_OK, EXIT_FAILURES, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# metrics_access.AUTH_MODES, spelled here so a sweep does not import aiohttp (0.6 s of start-up)
# to build its parser; a unit test keeps the two equal.
METRICS_AUTH_MODES = ("none", "kubernetes")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"  # the store sent no Date header: no age is judged
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def load_policy_file(path: str) -> Policy:
    """Read the one UploadLifecyclePolicy of a YAML file (other kinds are skipped)."""
    try:
        with open(path, encoding="utf-8") as handle:
            documents = [d for d in yaml.safe_load_all(handle) if d is not None]
    except FileNotFoundError:
        raise PolicyError("-f", f"{path}: no such file") from None
    except OSError as error:
        raise PolicyError("-f", f"{path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise PolicyError("-f", f"{path} is not valid YAML: {error}") from None
    except RecursionError:
        raise PolicyError("-f", f"{path} is nested too deeply to be a policy") from None
    policies = [d for d in documents if not isinstance(d, dict) or d.get("kind", KIND) == KIND]
    if len(policies) != 1:
        raise PolicyError("-f", f"{path} must hold exactly one {KIND}, found {len(policies)}")
    return parse_policy(policies[0])


def note_cluster_fields(policy: Policy, err: TextIO) -> None:
    """Say which of the policy's Kubernetes references this command does not use (it reads no
    Kubernetes object), and what it uses instead: one line each, on stderr."""
    store = policy.store
    chain = (
        "this command uses the standard AWS chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, "
        "AWS_ROLE_ARN with AWS_WEB_IDENTITY_TOKEN_FILE, ...)"
    )
    unused = []
    if store.credentials_secret_ref is not None:
        unused.append(("credentialsSecretRef", chain))
    if store.workload_identity is not None:
        unused.append(("serviceAccountRef", chain))
    if store.ca_bundle_ref is not None:
        unused.append(
            ("caBundleSecretRef", "this command trusts AWS_CA_BUNDLE if set, else the system CAs")
        )
    for field, instead in unused:
        err.write(
            f"note: spec.store.{field} is read by the operator and not used by the command "
            f"line: {instead}\n"
        )


def cli_credentials() -> StoreCredentials | None:
    """The CLI uses the standard AWS chain (env, profile, IRSA); LILT reads LILT_API_KEY."""
    api_key = os.environ.get("LILT_API_KEY")
    return StoreCredentials(api_key=api_key) if api_key else None


def print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


def print_sweep(result: SweepResult, out: TextIO) -> None:
    rows = [
        [
            "BUCKET",
            "SCANNED",
            "ELIGIBLE",
            "ABORTED",
            "ACTIVE",
            "GONE",
            "FAILED",
            "FREED",
            "REMAINING",
        ]
    ]
    for name, stats in sorted(result.buckets.items()):
        rows.append(
            [
                name,
                str(stats.scanned),
                str(stats.eligible),
                str(stats.aborted),
                str(stats.skipped_active),
                str(stats.already_gone),
                str(stats.failed),
                human_bytes(stats.freed_bytes),
                human_bytes(max(0, stats.incomplete_bytes - stats.freed_bytes)),
            ]
        )
    print_table(rows, out)
    summary = result.summary()
    mode = "dry run: nothing aborted, " if result.dry_run else ""
    out.write(
        f"\n{result.namespace}/{result.policy}: {mode}{summary['scanned']} scanned, "
        f"{summary['eligible']} eligible ({human_bytes(summary['eligibleBytes'])}), "
        f"{summary['aborted']} aborted, {human_bytes(summary['freedBytes'])} freed, "
        f"{summary['skippedActive']} active, {summary['alreadyGone']} already gone, "
        f"{summary['failed']} failed in {result.duration_seconds:.1f}s"
        + (" (stopped before the end)" if result.cancelled else "")
        + "\n"
    )
    for issue in result.issues:
        where = f" [{issue.container}]" if issue.container else ""
        out.write(f"error{where}: {issue.reason}: {issue.message}\n")


class SignalledEvent(threading.Event):
    """A cancel event that any thread sees set the moment a stop signal arrives.

    Python runs signal handlers on the main thread only once it holds the GIL, which with 64
    busy workers can take tens of milliseconds: enough for workers to pick up new uploads and
    abort them after the signal. The interpreter's C-level handler writes to the wakeup pipe
    at once, whatever thread the signal lands on; ``is_set`` (checked before every request)
    looks at that pipe."""

    def __init__(self, wakeup: int = -1) -> None:
        super().__init__()
        self.wakeup = wakeup

    def is_set(self) -> bool:
        if super().is_set():
            return True
        wakeup = self.wakeup
        if wakeup >= 0 and select.select([wakeup], [], [], 0)[0]:
            self.set()
            return True
        return False


@contextlib.contextmanager
def stop_on_signals(err: TextIO) -> Iterator[tuple[SignalledEvent, list[int]]]:
    """SIGINT (Ctrl-C) and SIGTERM set the yielded cancel event at once: the sweep then sends
    no new abort, drops what is queued, and still verifies and counts the aborts already sent.
    A second signal stops at once (KeyboardInterrupt), without the summary. Also yields the
    signals received. Outside the main thread (no signal reaches Python there) a plain event.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield SignalledEvent(), received
        return

    def on_signal(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        cancel.set()
        err.write(
            f"\n{signal.Signals(signum).name}: stopping; no new abort is sent, the aborts "
            "already sent are verified and counted (signal again to quit at once)\n"
        )
        err.flush()

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    cancel = SignalledEvent(read_end)
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        yield cancel, received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_wakeup)
        cancel.wakeup = -1
        os.close(read_end)
        os.close(write_end)


def command_sweep(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    policy = load_policy_file(args.file)
    note_cluster_fields(policy, err)
    if args.dry_run:
        policy = replace(policy, mode=Mode.DRY_RUN)
    store = open_store(policy.store, cli_credentials())
    progress = Progress(err)
    try:
        with stop_on_signals(err) as (cancel, stopped):
            result = run_sweep(policy, store, cancel=cancel, progress=progress)
    except KeyboardInterrupt:  # a second signal: quit now
        progress.finish()
        err.write("interrupted: uploads aborted so far stay aborted; run again to finish\n")
        return EXIT_INTERRUPTED
    finally:
        store.close()
    progress.finish()
    if args.output == "json":
        out.write(json.dumps(result.summary(), sort_keys=True) + "\n")
    else:
        print_sweep(result, out)
    out.flush()
    if stopped:
        err.write("stopped: the summary above is what was done; run again to finish\n")
        return EXIT_INTERRUPTED
    return EXIT_OK if result.ok else EXIT_FAILURES


def command_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Streams the inventory: rows are printed as they are measured, never all held at once."""
    policy = load_policy_file(args.file)
    note_cluster_fields(policy, err)
    store = open_store(policy.store, cli_credentials())
    json_output = args.output == "json"
    width = max([len(b) for b in (policy.store.s3.buckets if policy.store.s3 else ())] + [12])
    count = 0
    if json_output:
        out.write('{"uploads": [')
    else:
        out.write(
            f"{'BUCKET':<{width}}  {'AGE':>6}  {'PARTS':>5}  {'BYTES':>10}  "
            f"{'STATE':<8}  {'UPLOAD ID':<20}  KEY\n"
        )
    try:
        for item in inventory(policy, store):
            state = "eligible" if item.eligible else ("active" if item.active else "young")
            if item.age is None:
                state = "no-clock"
            age_seconds = None if item.age is None else int(item.age.total_seconds())
            upload = item.upload
            if json_output:
                record = {
                    "bucket": upload.container,
                    "key": upload.key,
                    "uploadId": upload.upload_id,
                    "initiated": upload.initiated.isoformat(),
                    "ageSeconds": age_seconds,
                    "parts": item.part_count,
                    "bytes": item.size_bytes,
                    "state": state,
                }
                out.write(("" if count == 0 else ", ") + json.dumps(record))
            else:
                upload_id = upload.upload_id
                short_id = upload_id if len(upload_id) <= 20 else upload_id[:17] + "..."
                out.write(
                    f"{upload.container:<{width}}  {human_age(age_seconds):>6}  "
                    f"{item.part_count:>5}  {human_bytes(item.size_bytes):>10}  {state:<8}  "
                    f"{short_id:<20}  {upload.key}\n"
                )
            count += 1
    except StoreError as error:
        if json_output:
            out.write("]}\n")
        err.write(f"error: {error.reason}: {error}\n")
        return EXIT_FAILURES
    finally:
        store.close()
    if json_output:
        out.write("]}\n")
    else:
        out.write(f"\n{count} incomplete uploads\n")
    return EXIT_OK


def command_lilt_record(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from datetime import datetime

    from mpu_janitor.stores.lilt import InventoryError, record_part, record_upload

    try:
        if args.part_time is not None:
            at = None
            if args.part_time != "now":
                at = datetime.fromisoformat(args.part_time)
                if at.tzinfo is None:
                    raise PolicyError("--part-time", f"{args.part_time!r} has no time zone")
            record_part(args.inventory, args.upload_id, at=at)
        elif not args.key:
            raise PolicyError("--key", "is required to record an upload (or give --part-time)")
        else:
            record_upload(
                args.inventory, args.upload_id, args.key, filename=args.filename, size=args.size
            )
    except PolicyError:
        raise
    except ValueError as error:
        field = "--part-time" if args.part_time is not None else "lilt-record"
        raise PolicyError(field, str(error)) from None
    except InventoryError as error:
        raise PolicyError("--inventory", str(error)) from None
    except OSError as error:
        raise PolicyError("--inventory", f"{args.inventory}: {error.strerror}") from None
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpu-janitor",
        description="Find, abort and account for stale incomplete multipart uploads.",
    )
    parser.add_argument("--version", action="version", version=f"mpu-janitor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log store calls")
    commands = parser.add_subparsers(dest="command", required=True)

    sweep = commands.add_parser("sweep", help="run one sweep of a policy file")
    sweep.add_argument("-f", "--file", required=True, help="an UploadLifecyclePolicy YAML file")
    sweep.add_argument("--dry-run", action="store_true", help="count what would be freed only")
    sweep.add_argument("--output", "-o", choices=("table", "json"), default="table")
    sweep.set_defaults(run=command_sweep)

    listing = commands.add_parser("list", help="print the incomplete uploads a policy covers")
    listing.add_argument("-f", "--file", required=True, help="an UploadLifecyclePolicy YAML file")
    listing.add_argument("--output", "-o", choices=("table", "json"), default="table")
    listing.set_defaults(run=command_list)

    record = commands.add_parser(
        "lilt-record",
        help="record a LILT multipart upload in an inventory (for uploaders, after initiate)",
    )
    record.add_argument("--inventory", required=True, help="the policy's lilt.inventoryPath")
    record.add_argument("--upload-id", required=True, help="uploadId from the initiate response")
    record.add_argument("--key", help="key (the S3 key) from that response")
    record.add_argument("--size", type=int, help="the file size declared at initiation")
    record.add_argument(
        "--filename",
        help="the file's name as sent to initiate (compared with LILT's pending uploads)",
    )
    record.add_argument(
        "--part-time",
        nargs="?",
        const="now",
        metavar="TIME",
        help="record that a part of --upload-id arrived at TIME (RFC 3339 with a zone; "
        "default now), so the sweep can honour quietPeriod",
    )
    record.set_defaults(run=command_lilt_record)

    operator = commands.add_parser("operator", help="run the Kubernetes operator")
    scope = operator.add_mutually_exclusive_group()
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="watch policies in every namespace (the default)",
    )
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only this namespace (repeatable)",
    )
    operator.add_argument("--metrics-address", default="0.0.0.0")
    operator.add_argument("--metrics-port", type=int, default=8080)
    operator.add_argument(
        "--metrics-tls-cert", metavar="FILE", help="serve /metrics over HTTPS with this PEM chain"
    )
    operator.add_argument("--metrics-tls-key", metavar="FILE", help="its PEM private key")
    operator.add_argument(
        "--metrics-auth",
        choices=METRICS_AUTH_MODES,
        default="none",
        help="kubernetes: each scrape's bearer token is checked (TokenReview) and its user must "
        "be allowed get on /metrics (SubjectAccessReview); needs --metrics-tls-cert",
    )
    peering = operator.add_mutually_exclusive_group()
    peering.add_argument("--peering", help="Kopf peering name: one replica sweeps, others wait")
    peering.add_argument("--standalone", action="store_true", help="no peering (one replica)")
    operator.add_argument(
        "--lilt-inventory-dir",
        default=DEFAULT_LILT_INVENTORY_DIR,
        help="LILT policies may only name inventories under this directory",
    )
    operator.add_argument(
        "--ambient-credentials-namespaces",
        metavar="NS[,NS...]",
        help="namespaces whose policies may use the operator's own AWS identity when they name "
        "no Secret (default: the operator's own namespace, from POD_NAMESPACE or its "
        "ServiceAccount; empty: none)",
    )
    operator.add_argument(
        "--allowed-endpoints",
        metavar="REGEX",
        action="append",
        default=[],
        help="an endpoint a policy may name (a regular expression matching the whole URL; "
        "repeatable): when given, every endpoint must match one; link-local and metadata "
        "addresses are refused unless one matches",
    )
    operator.add_argument(
        "--sts-endpoint",
        metavar="URL",
        default=os.environ.get("AWS_ENDPOINT_URL_STS") or None,
        help="the STS that exchanges the ServiceAccount tokens of policies with "
        "spec.store.serviceAccountRef (default: AWS_ENDPOINT_URL_STS, else AWS STS in each "
        "target's region)",
    )
    operator.add_argument(
        "--selector",
        "-l",
        type=_selector_flag,
        metavar="SELECTOR",
        help="serve only the policies whose labels match this label selector (kubectl -l "
        "syntax, e.g. shard=a): one operator release per shard, each with its own peering",
    )
    operator.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="json: one object a line"
    )
    operator.add_argument(
        "--context",
        help="the kubeconfig context to use (default: in a Pod its ServiceAccount, else the "
        "current context of KUBECONFIG or ~/.kube/config)",
    )
    operator.add_argument(
        "--namespace-max-concurrent-sweeps",
        type=int,
        default=0,
        metavar="N",
        help="at most N sweeps of one namespace's policies at once (0: no cap)",
    )
    operator.add_argument(
        "--namespace-max-requests-per-second",
        type=float,
        default=0.0,
        metavar="RATE",
        help="store requests a second shared by all sweeps of one namespace (0: no cap)",
    )
    operator.set_defaults(run=None)
    return parser


def _selector_flag(text: str) -> LabelSelector:
    try:
        return parse_selector(text)
    except SelectorError as error:
        raise argparse.ArgumentTypeError(f"the label selector {error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # -v logs botocore's requests: secret values and signatures are scrubbed from every record.
    remember_environment_secrets()
    install_redaction()
    if args.command == "operator":
        from mpu_janitor import handlers

        ambient = args.ambient_credentials_namespaces
        if ambient is None:
            own = operator_namespace()
            ambient = own or ""
        try:
            tenancy = Tenancy.from_flags(
                parse_namespaces([ambient]), args.allowed_endpoints, args.sts_endpoint
            )
            fairness = FairnessLimits(
                args.namespace_max_concurrent_sweeps, args.namespace_max_requests_per_second
            )
            from mpu_janitor.metrics_access import tls_options

            tls_options(args.metrics_tls_cert, args.metrics_tls_key, args.metrics_auth)
        except ValueError as error:
            parser.error(str(error))
        return handlers.run_operator(
            tenancy=tenancy,
            fairness=fairness,
            metrics_tls_cert=args.metrics_tls_cert,
            metrics_tls_key=args.metrics_tls_key,
            metrics_auth=args.metrics_auth,
            namespaces=args.namespace,
            metrics_address=args.metrics_address,
            metrics_port=args.metrics_port,
            peering=None if args.standalone else args.peering,
            verbose=args.verbose,
            lilt_inventory_dir=args.lilt_inventory_dir,
            log_format=args.log_format,
            kube_context=args.context,
            selector=args.selector,
        )
    try:
        code: int = args.run(args, sys.stdout, sys.stderr)
        return code
    except (PolicyError, UnusableTarget) as error:
        sys.stderr.write(f"error: invalid policy: {error}\n")
        return EXIT_BAD_INPUT
    except StoreError as error:
        sys.stderr.write(f"error: {error.reason}: {error}\n")
        return EXIT_FAILURES
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
