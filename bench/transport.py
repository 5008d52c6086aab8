"""Transport and wire cost next to the peers: rt2_ros's clients and the peers' own clients on null servers.

Part 1 (latency): every client makes calls with a 224x224x3 image + instruction to a null policy on
loopback; clients take turns in one launch (one block of calls each per round, the order rotated every
round) so machine load hits them alike. Servers, each a separate process:

* rt2-serve (``python -m rt2_ros.serve``) hosting the ``scripted`` backend (a fixed answer, no model):
  rt2_ros grpc unary / streaming x raw / JPEG / PNG;
* test/servers/openpi_policy_server.py (openpi's wire format: metadata first, msgpack-numpy frames):
  openpi-client's ``WebsocketClientPolicy`` (peer) and rt2_ros's ``openpi`` backend;
* test/servers/openvla_deploy_server.py (deploy.py's ``POST /act``, FastAPI + json-numpy): an OpenVLA-style
  client as OpenVLA's README shows it (a requests.Session posting json-numpy) (peer) and rt2_ros's
  ``openvla_http`` backend;
* bench/null_servers.py openai (vLLM's chat completions on uvicorn, as vLLM serves them): rt2_ros's
  ``openai`` backend.

Part 2 (bytes and codec cost, in-process, no network): bytes of one observation's payload on the wire
(application payload: protobuf message, msgpack frame, JSON body; HTTP/2, HTTP and websocket framing
not counted) for each transport and encoding at 224x224 and 640x480, one and two cameras, the
client's encode time (resize off: the frame as given) and the server side's decode time (what rt2-serve,
the openpi server, deploy.py and vLLM's server do with the bytes before the model sees an image).

The test image is a synthetic scene (smooth gradient, flat blocks, mild sensor noise): JPEG/PNG sizes
depend on content, pure noise would be the worst case. Prints Markdown tables and writes
bench/results/transport.md (with the machine and the load before and after) and transport*.png.

    .venv/bin/python bench/transport.py            # 3 rounds x 1000 calls per client (~1.5 min)
    .venv/bin/python bench/transport.py --quick    # 2 rounds x 100 calls, fewer codec repeats
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the working tree's rt2_ros and test servers
    sys.path.insert(0, str(ROOT))

from rt2_ros import imaging  # noqa: E402
from rt2_ros.actions import Observation  # noqa: E402
from rt2_ros.backends import create_backend  # noqa: E402
from rt2_ros.tokens import ActionTokenizer  # noqa: E402
from test.processes import terminate, wait_for_line  # noqa: E402

SERVERS = ROOT / "test" / "servers"
INSTRUCTION = "pick up the red block"
CALL_TIMEOUT_S = 2.0
SIZES = {"224x224": (224, 224), "640x480": (480, 640)}  # name -> (height, width)
GRPC_PARAMS = """rt2_policy:
  ros__parameters:
    backend:
      type: scripted
      scripted: {answers: ["0 128 128 128 128 128 128 0"], delays_s: [0.0]}
    tokenizer: {profile: rt2}
"""


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A synthetic camera frame: table-like gradient, a few flat blocks, noise of sigma 3 (a camera's)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([90 + 60 * y / height, 80 + 40 * x / width, 70 + 30 * (x + y) / (width + height)], axis=-1)
    for _ in range(4):
        h, w = rng.integers(height // 10, height // 4), rng.integers(width // 10, width // 4)
        top, left = rng.integers(0, height - h), rng.integers(0, width - w)
        img[top:top + h, left:left + w] = rng.integers(20, 235, 3)
    img += rng.normal(0.0, 3.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def observation(image: np.ndarray, seq: int, wrist: np.ndarray | None = None) -> Observation:
    images = {"camera": image} if wrist is None else {"camera": image, "wrist": wrist}
    return Observation(image=image, instruction=INSTRUCTION, seq=seq, stamp=time.time(), images=images)


# -- servers --------------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int

    def stop(self) -> None:
        terminate(self.proc)


def spawn(name: str, argv: list[str], workdir: Path) -> subprocess.Popen:
    with open(workdir / f"{name}.stderr", "w") as stderr:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_ready(name: str, proc: subprocess.Popen, ready: re.Pattern, workdir: Path, timeout_s: float = 60.0
               ) -> Server:
    """Wait (bounded) for a stdout line of ``proc`` matching ``ready`` (group 1 = the port)."""
    match = wait_for_line(proc, ready, name, workdir / f"{name}.stderr", timeout_s)
    return Server(name, proc, int(match.group(1)))


def start_servers(workdir: Path, served_answers: str = GRPC_PARAMS, openpi_args: tuple[str, ...] = ()
                  ) -> dict[str, Server]:
    """The four null servers, started at once (their imports overlap) and each waited for; rt2-serve
    hosts the ``scripted`` backend of the params file text ``served_answers``, the openpi server
    takes ``openpi_args`` (e.g. its chunk size)."""
    py = sys.executable
    ready = re.compile(r"^READY (\d+)")
    params = workdir / "grpc_null.yaml"
    params.write_text(served_answers)
    commands = {
        "grpc": ([py, "-m", "rt2_ros.serve", "--backend", "scripted", "--params", str(params), "--port", "0",
                  "--log-level", "WARNING", "--summary-interval-s", "3600"],
                 re.compile(r"serving .* on 127\.0\.0\.1:(\d+)")),
        "openpi": ([py, str(SERVERS / "openpi_policy_server.py"), "--log", str(workdir / "openpi.jsonl"),
                    *openpi_args], ready),
        "openvla": ([py, str(SERVERS / "openvla_deploy_server.py"), "--log", str(workdir / "openvla.jsonl")], ready),
        "openai": ([py, str(ROOT / "bench" / "null_servers.py"), "openai"], ready),
    }
    procs = {name: spawn(name, argv, workdir) for name, (argv, _) in commands.items()}
    servers: dict[str, Server] = {}
    try:
        for name, proc in procs.items():
            servers[name] = wait_ready(name, proc, commands[name][1], workdir)
    except Exception:
        for name, proc in procs.items():
            Server(name, proc, 0).stop()
        raise
    return servers


# -- clients --------------------------------------------------------------------------------------

@dataclass
class Client:
    name: str
    side: str  # "rt2_ros" or "peer"
    server: str
    call: Callable[[int], object]
    close: Callable[[], None]


def make_clients(servers: dict[str, Server], image: np.ndarray) -> list[Client]:
    rt2 = ActionTokenizer.from_profile("rt2")
    openvla = ActionTokenizer.from_profile("openvla")
    clients: list[Client] = []

    def backend_client(name: str, server: str, backend_type: str, options: dict, tokenizer: ActionTokenizer
                       ) -> Client:
        backend = create_backend(backend_type, options, tokenizer)
        return Client(name, "rt2_ros", server, lambda seq: backend.infer(observation(image, seq), CALL_TIMEOUT_S),
                      backend.close)

    grpc_target = f"127.0.0.1:{servers['grpc'].port}"
    for streaming in (False, True):
        for encoding in ("raw", "jpeg", "png"):
            kind = "streaming" if streaming else "unary"
            clients.append(backend_client(f"grpc {kind} {encoding}", "rt2-serve", "grpc",
                                          {"target": grpc_target, "image_encoding": encoding,
                                           "use_streaming": streaming}, rt2))
    openpi_url = f"ws://127.0.0.1:{servers['openpi'].port}"
    clients.append(backend_client("openpi", "openpi", "openpi", {"url": openpi_url, "state_key": ""}, openvla))
    clients.append(backend_client("openvla_http", "deploy.py", "openvla_http",
                                  {"url": f"http://127.0.0.1:{servers['openvla'].port}"}, openvla))
    clients.append(backend_client("openai (JPEG)", "vLLM-like", "openai",
                                  {"base_url": f"http://127.0.0.1:{servers['openai'].port}/v1",
                                   "model": "rt2-null", "guided_decoding_field": "none"}, rt2))
    clients.append(peer_openpi(servers["openpi"].port, image))
    clients.append(peer_openvla(servers["openvla"].port, image))
    return clients


def peer_openpi(port: int, image: np.ndarray) -> Client:
    """openpi-client's own WebsocketClientPolicy, as openpi's examples use it."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policy = WebsocketClientPolicy(host="127.0.0.1", port=port)
    return Client("openpi-client WebsocketClientPolicy", "peer", "openpi",
                  lambda seq: policy.infer({"observation/image": image, "prompt": INSTRUCTION}),
                  lambda: policy._ws.close())


def peer_openvla(port: int, image: np.ndarray) -> Client:
    """OpenVLA's README client: requests + json-numpy (the README calls ``json_numpy.patch()`` and posts
    ``json=``; the same encoding is called directly here so the patch does not change this process's
    ``json`` for the other clients) on one keep-alive Session."""
    import json_numpy
    import requests

    session = requests.Session()
    url = f"http://127.0.0.1:{port}/act"

    def call(seq: int) -> object:
        body = json_numpy.dumps({"image": image, "instruction": INSTRUCTION, "unnorm_key": "bridge_orig"})
        response = session.post(url, data=body, headers={"Content-Type": "application/json"})
        return json_numpy.loads(response.text)

    return Client("OpenVLA README client (requests + json-numpy)", "peer", "deploy.py", call, session.close)


# -- part 1: latency ------------------------------------------------------------------------------

def measure_latency(clients: list[Client], rounds: int, calls: int, warmup: int) -> dict[str, np.ndarray]:
    for client in clients:
        for i in range(warmup):
            client.call(i + 1)
    samples: dict[str, list[float]] = {c.name: [] for c in clients}
    seq = warmup + 1
    for r in range(rounds):
        order = clients[r % len(clients):] + clients[:r % len(clients)]  # rotate: nobody always goes first
        for client in order:
            out = samples[client.name]
            for _ in range(calls):
                seq += 1
                t0 = time.perf_counter()
                client.call(seq)
                out.append(time.perf_counter() - t0)
    return {name: np.array(values) * 1000.0 for name, values in samples.items()}


def latency_table(clients: list[Client], lat: dict[str, np.ndarray]) -> tuple[str, dict[str, float]]:
    p50 = {name: float(np.percentile(v, 50)) for name, v in lat.items()}
    reference = p50["openpi-client WebsocketClientPolicy"]
    rows = ["| client | side | server | calls | p50 ms | p95 ms | p99 ms | p50 / openpi-client |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for c in sorted(clients, key=lambda c: p50[c.name]):
        v = lat[c.name]
        rows.append(f"| {c.name} | {c.side} | {c.server} | {v.size} | {p50[c.name]:.3f} | "
                    f"{np.percentile(v, 95):.3f} | {np.percentile(v, 99):.3f} | {p50[c.name] / reference:.2f} |")
    return "\n".join(rows), p50


# -- part 2: bytes and codec cost -----------------------------------------------------------------

def best_ms(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """After one warm-up call, the median wall time of ``fn`` over ``repeats`` runs (ms) and its last result."""
    result = fn()  # warm-up: first-call costs (imports, codec tables) are not per-observation costs
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times)), result


def codec_rows(repeats: int) -> list[dict]:
    """Bytes, encode and server-side decode time per observation for every transport and encoding."""
    return [row for size_name in SIZES for cameras in (1, 2) for row in codec_cell(size_name, cameras, repeats)]


def codec_cell(size_name: str, cameras: int, repeats: int) -> list[dict]:
    import json_numpy
    from openpi_client import msgpack_numpy

    from rt2_ros.backends.grpc_client import observation_to_proto, pb
    from rt2_ros.serve import observation_from_proto

    max_pixels = 4096 * 4096
    h, w = SIZES[size_name]
    image, wrist = scene(h, w, 0), scene(h, w, 1) if cameras == 2 else None
    obs = observation(image, 1, wrist)
    frames = list(obs.images.values())
    rows: list[dict] = []

    def add(transport: str, encode: Callable[[], bytes], decode: Callable[[bytes], object]) -> None:
        enc_ms, data = best_ms(encode, repeats)
        dec_ms, _ = best_ms(lambda: decode(data), repeats)
        rows.append({"size": size_name, "cameras": cameras, "transport": transport, "bytes": len(data),
                     "encode_ms": enc_ms, "decode_ms": dec_ms})

    for encoding in ("raw", "jpeg", "png"):
        add(f"rt2_ros grpc {encoding}", lambda e=encoding: observation_to_proto(obs, e).SerializeToString(),
            lambda data: observation_from_proto(pb.Observation.FromString(data), max_pixels))
    keys = ["observation/image", "observation/wrist_image"][:cameras]
    packer = msgpack_numpy.Packer()
    add("openpi msgpack-numpy (openpi-client and rt2_ros)",
        lambda: packer.pack({**dict(zip(keys, frames, strict=True)), "prompt": INSTRUCTION}), msgpack_numpy.unpackb)
    for fmt in ("jpeg", "png"):
        add(f"OpenAI chat data URL {fmt} (rt2_ros openai)", lambda f=fmt: openai_body(frames, f).encode(),
            openai_decode)
    if cameras == 1:  # deploy.py takes one image
        add("OpenVLA json-numpy (README client and rt2_ros openvla_http)",
            lambda: json_numpy.dumps({"image": image, "instruction": INSTRUCTION, "unnorm_key": "bridge_orig"}
                                     ).encode(), json_numpy.loads)
    return rows


def openai_body(frames: list[np.ndarray], fmt: str) -> str:
    """The chat completions body rt2_ros's openai backend sends (image parts, then the prompt)."""
    parts: list[dict] = []
    for index, frame in enumerate(frames):
        data = imaging.encode_jpeg(frame, 90) if fmt == "jpeg" else imaging.encode_png(frame)
        if len(frames) > 1:
            parts.append({"type": "text", "text": f"cam{index}:"})
        parts.append({"type": "image_url", "image_url": {
            "url": f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"}})
    parts.append({"type": "text", "text": f"Q: what action should the robot take to {INSTRUCTION}? A:"})
    return json.dumps({"model": "rt2", "messages": [{"role": "user", "content": parts}], "temperature": 0.0,
                       "max_tokens": 48})


def openai_decode(data: bytes) -> list[np.ndarray]:
    request = json.loads(data)
    return [imaging.decode_image(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))
            for p in request["messages"][0]["content"] if p["type"] == "image_url"]


def codec_table(rows: list[dict]) -> str:
    out = ["| image | cameras | transport / encoding | bytes / observation | encode ms (client) | "
           "decode ms (server) |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['size']} | {r['cameras']} | {r['transport']} | {r['bytes']:,} | {r['encode_ms']:.3f} | "
                   f"{r['decode_ms']:.3f} |")
    return "\n".join(out)


# -- targets, machine, plots ----------------------------------------------------------------------

def targets(p50: dict[str, float], rows: list[dict]) -> str:
    remote = {k: v for k, v in p50.items() if k.startswith("grpc") or k in ("openpi", "openvla_http",
                                                                            "openai (JPEG)")}
    fastest = min(remote, key=remote.get)
    peer_openpi_p50 = p50["openpi-client WebsocketClientPolicy"]
    peer_openvla_p50 = p50["OpenVLA README client (requests + json-numpy)"]
    default = p50["grpc unary jpeg"]

    def nbytes(transport: str) -> int:
        return next(r["bytes"] for r in rows if r["size"] == "224x224" and r["cameras"] == 1
                    and r["transport"].startswith(transport))

    jpeg_bytes, openvla_bytes = nbytes("rt2_ros grpc jpeg"), nbytes("OpenVLA")

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines = [
        "| target | measured | |",
        "|---|---|---|",
        f"| fastest rt2_ros remote transport p50 <= openpi-client p50 | {fastest} {remote[fastest]:.3f} ms vs "
        f"openpi-client {peer_openpi_p50:.3f} ms | {verdict(remote[fastest] <= peer_openpi_p50)} |",
        f"| default path (grpc unary JPEG) >= 2x below the OpenVLA REST client | {default:.3f} ms vs "
        f"{peer_openvla_p50:.3f} ms ({peer_openvla_p50 / default:.1f}x) | {verdict(peer_openvla_p50 >= 2 * default)} |",
        f"| default path >= 20x fewer bytes than OpenVLA (224x224, one camera) | {jpeg_bytes:,} B vs "
        f"{openvla_bytes:,} B ({openvla_bytes / jpeg_bytes:.1f}x) | {verdict(openvla_bytes >= 20 * jpeg_bytes)} |",
    ]
    return "\n".join(lines)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def plot(clients: list[Client], lat: dict[str, np.ndarray], rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = sorted(lat, key=lambda n: np.percentile(lat[n], 50))
    side = {c.name: c.side for c in clients}
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    p50 = [np.percentile(lat[n], 50) for n in names]
    p95 = [np.percentile(lat[n], 95) for n in names]
    y = np.arange(len(names))
    ax.barh(y, p50, color=["tab:blue" if side[n] == "rt2_ros" else "tab:orange" for n in names], label="p50")
    ax.errorbar(p95, y, fmt="k|", markersize=10)
    ax.set_yticks(y, [f"{n} ({side[n]})" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("call latency, ms (loopback, null policy, 224x224x3 + instruction)")
    ax.legend(handles=[Patch(color="tab:blue", label="rt2_ros p50"), Patch(color="tab:orange", label="peer p50"),
                       Line2D([], [], color="k", marker="|", linestyle="", markersize=10, label="p95")],
              loc="lower right")
    fig.tight_layout()
    latency_png = out_dir / "transport.png"
    fig.savefig(latency_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, size in zip(axes, SIZES, strict=True):
        sel = [r for r in rows if r["size"] == size]
        transports = list(dict.fromkeys(r["transport"] for r in sel))
        y = np.arange(len(transports))
        for k, cameras in enumerate((1, 2)):
            vals = [next((r["bytes"] for r in sel if r["transport"] == t and r["cameras"] == cameras), 0)
                    for t in transports]
            ax.barh(y + 0.4 * k, vals, height=0.4, label=f"{cameras} camera{'s' * (cameras > 1)}")
        ax.set_xscale("log")
        ax.set_title(size)
        ax.set_xlabel("bytes per observation (log)")
        ax.set_yticks(y + 0.2, [t.split(" (")[0] for t in transports], fontsize=8)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    bytes_png = out_dir / "transport_bytes.png"
    fig.savefig(bytes_png, dpi=110)
    plt.close(fig)
    return [latency_png, bytes_png]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds; every client takes one block of calls per round")
    ap.add_argument("--calls", type=int, default=1000, help="calls per client per round")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured calls per client first")
    ap.add_argument("--codec-repeats", type=int, default=30, help="encode/decode repeats per cell (median taken)")
    ap.add_argument("--quick", action="store_true", help="2 rounds x 100 calls, 10 codec repeats")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder of transport.md/.png")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.codec_repeats = 2, 100, 10
    if min(args.rounds, args.calls, args.codec_repeats) < 1 or args.warmup < 0:
        ap.error("--rounds, --calls and --codec-repeats must be >= 1, --warmup >= 0")
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = load()
    started = time.monotonic()
    image = scene(224, 224)
    with tempfile.TemporaryDirectory(prefix="rt2-bench-transport-") as tmp:
        servers = start_servers(Path(tmp))
        clients: list[Client] = []
        try:
            clients = make_clients(servers, image)
            lat = measure_latency(clients, args.rounds, args.calls, args.warmup)
        finally:
            for client in clients:
                client.close()
            for server in servers.values():
                server.stop()
    rows = codec_rows(args.codec_repeats)
    load_after = load()
    lat_md, p50 = latency_table(clients, lat)
    codec_md = codec_table(rows)
    targets_md = targets(p50, rows)
    report = "\n\n".join([
        "# Transport and wire cost (bench/transport.py)",
        f"Machine: {machine()}.  \nLoad before: `{load_before}`  \nLoad after: `{load_after}`  \n"
        f"Run: {args.rounds} rounds x {args.calls} calls per client (interleaved, {args.warmup} warm-up calls "
        f"each), {args.codec_repeats} codec repeats per cell, {time.monotonic() - started:.0f} s. "
        "Other processes shared the CPU: compare rows of one run, not runs.",
        "## Call latency: 224x224x3 image + instruction, null policy, loopback",
        lat_md,
        "## Bytes and codec cost per observation (payload bytes; encode on the client, decode on the server side)",
        codec_md,
        "## Targets",
        targets_md,
    ]) + "\n"
    print(report)
    (args.out / "transport.md").write_text(report)
    if not args.no_plots:
        for path in plot(clients, lat, rows, args.out):
            print(f"wrote {path}")
    print(f"wrote {args.out / 'transport.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
