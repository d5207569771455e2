"""Scale-out on Ray Serve: N engine replicas behind one websocket address.

    python serve.py --replicas 2                        # a local Ray, 2 replicas, ws://127.0.0.1:8765/v1/realtime
    python serve.py --replicas 2 --ray-address auto     # an existing cluster (ray start --head / --address)
    python serve.py --replicas 2 --min-replicas 1 --max-replicas 8   # autoscaled by active sessions

Each replica is one `NestvoxReplica`: it builds the model and engine with the
code `python serve.py` uses (serve.build_server), starts the engine thread, and
is the FastAPI ingress itself, so a conversation's websocket is proxied by Serve
to one replica and stays there for its life (no second hop through another
deployment). Pieces:

- Admission: every ongoing request on a replica is a live conversation (or a
  short /healthz or /metrics). `LeastSessionsRouter` hands a new connection to
  the replica with the fewest ongoing requests (Serve's router probes them all,
  not two at random), so a session lands on a replica with room whenever one has
  room. `max_ongoing_requests` is max_sessions plus a few slots of headroom, so
  when every replica is full the connection still reaches one, which answers
  `server_full` and closes with 1013 (Serve's own back-pressure would queue it,
  or refuse the handshake with HTTP 503, before any protocol event).
- Health and metrics: each replica reports its `health()` and Prometheus text to
  a `Registry` (a Serve deployment-scoped actor, created and restarted by the
  Serve controller) once a second and whenever a session opens or closes;
  whichever replica answers /healthz or /metrics reads the registry, so both
  cover the whole application (metrics get a `replica` label).
- Autoscaling: Serve's `autoscaling_config` on ongoing requests (= sessions),
  with `target_ongoing_requests` = --target-sessions.
- Drain: a replica Serve removes leaves the router's set first, then Serve waits
  (graceful_shutdown_timeout_s = --drain-timeout-s) until its conversations have
  ended; a connection that still reaches it meanwhile (a stale route) is refused
  with `server_full` / 1013 (reconnect) instead of lengthening the drain.
- Faults: a replica process that dies takes its conversations with it (Serve's
  proxy closes their websockets); Serve's controller notices the dead actor and
  starts a replacement, and the router stops routing to it at the first failed
  probe, so a caller that reconnects lands on a live replica.
"""

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

import ray
from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from ray import serve
from ray.serve.config import DeploymentActorConfig, RequestRouterConfig
from ray.serve.request_router import FIFOMixin, RequestRouter

log = logging.getLogger("nestvox.ray_serve")
APP_NAME = "nestvox"
REGISTRY = "registry"
REPORT_PERIOD_S = 1.0
STALE_AFTER_S = 3.5  # a replica that has not reported for this long is gone (killed, partitioned)
HEADROOM = 4  # ongoing requests beyond max_sessions: /healthz, /metrics and server_full refusals


# -- the websocket the realtime server talks to ------------------------------------------

class ClientGone(Exception):
    """The websocket ended (the client left, or Serve's proxy dropped the connection)."""

    def __init__(self, code: Optional[int] = None):
        super().__init__(f"websocket closed (code {code})")
        self.code = code


class StarletteSocket:
    """A Starlette/FastAPI WebSocket as the `ws` RealtimeServer.serve_connection takes:
    `recv()` gives bytes for binary frames and str for text, and raises ClientGone
    once the client is gone; `send(text)`; `close(code, reason)`."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.closed: Optional[int] = None

    async def recv(self):
        if self.closed is not None:
            raise ClientGone(self.closed)
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            self.closed = message.get("code", 1000)
            raise ClientGone(self.closed)
        data = message.get("bytes")
        return data if data is not None else message.get("text", "")

    async def send(self, text: str) -> None:
        if self.closed is not None:
            raise ClientGone(self.closed)
        await self.ws.send_text(text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed is None:
            self.closed = code
            try:
                await self.ws.close(code, reason)
            except RuntimeError:  # already closed underneath us
                pass


# -- Serve's proxy: a clear close when a replica dies -------------------------------------

LOST_CODE = 1012  # "service restart": this conversation is gone, reconnect (Serve is replacing the replica)
LOST_REASON = "nestvox replica lost: reconnect"


def patch_proxy() -> None:
    """Worker setup hook (every Ray worker of this job, so also Serve's proxy actor).
    When a replica dies mid-conversation, Serve's HTTP proxy (ray 2.60) ends the
    client's websocket with no close frame at all (the client sees 1006, "abnormal").
    Wrap its per-request generator: a websocket that was accepted, has no close yet
    and ends in an error status gets a close frame with LOST_CODE first."""
    try:
        from ray.serve._private.proxy import HTTPProxy
    except Exception:  # another Ray layout: clients see Serve's own behaviour
        return
    original = HTTPProxy.send_request_to_replica
    if getattr(original, "_nestvox", False):
        return

    async def send_request_to_replica(self, request_id, internal_request_id, handle, proxy_request,
                                      app_is_cross_language=False):
        accepted = closed = False
        async for message in original(self, request_id, internal_request_id, handle, proxy_request,
                                      app_is_cross_language):
            if isinstance(message, dict):
                kind = message.get("type")
                accepted = accepted or kind == "websocket.accept"
                closed = closed or kind in ("websocket.close", "websocket.disconnect")
            elif (accepted and not closed and getattr(proxy_request, "request_type", None) == "websocket"
                  and getattr(message, "is_error", False) and str(getattr(message, "code", "")) in ("500", "503")):
                yield {"type": "websocket.close", "code": LOST_CODE, "reason": LOST_REASON}
            yield message

    send_request_to_replica._nestvox = True
    HTTPProxy.send_request_to_replica = send_request_to_replica


RUNTIME_ENV = {"worker_process_setup_hook": "agent.realtime.ray_serve.patch_proxy"}


def init_ray(address: Optional[str] = None, **kwargs) -> None:
    """ray.init with the job's runtime env (the proxy patch above); the proxy must be
    started by this job (serve.start) for the patch to reach it."""
    ray.init(address=address, runtime_env=RUNTIME_ENV, **kwargs)


# -- routing -----------------------------------------------------------------------------

class LeastSessionsRouter(FIFOMixin, RequestRouter):
    """Offer Serve's router every replica at once: it probes their queue lengths
    (cached between probes) and picks the shortest among those under
    max_ongoing_requests. The default power-of-two-choices samples two replicas,
    which with 3+ replicas can put a session on a full one while another has room."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [list(candidate_replicas)] if candidate_replicas else []


# -- the registry --------------------------------------------------------------------------

class Registry:
    """What each replica last reported: {id: (time, health dict, metrics text)}."""

    def __init__(self):
        self.entries: Dict[str, tuple] = {}

    def report(self, replica_id: str, health: dict, metrics: str) -> None:
        self.entries[replica_id] = (time.time(), health, metrics)

    def remove(self, replica_id: str) -> None:
        self.entries.pop(replica_id, None)

    def snapshot(self) -> Dict[str, tuple]:
        now = time.time()
        for rid in [r for r, (t, _, _) in self.entries.items() if now - t > STALE_AFTER_S]:
            del self.entries[rid]
        return {rid: (round(now - t, 2), h, m) for rid, (t, h, m) in self.entries.items()}


def merge_metrics(per_replica: Dict[str, str], extra: Optional[List[str]] = None) -> str:
    """One Prometheus text from each replica's: every sample gets a `replica` label,
    and each metric family is written once (TYPE line, then all replicas' samples)."""
    families: Dict[str, dict] = {}
    for rid in sorted(per_replica):
        family = None
        for line in per_replica[rid].splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split()
                if len(parts) >= 4 and parts[1] == "TYPE":
                    family = families.setdefault(parts[2], {"type": line, "samples": []})
                continue
            m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(.*)$", line)
            if not m:
                continue
            name, _, labels, value = m.groups()
            labels = f'replica="{rid}"' + (f",{labels}" if labels else "")
            if family is None:  # a sample without a TYPE line: its own family
                family = families.setdefault(name, {"type": None, "samples": []})
            family["samples"].append(f"{name}{{{labels}}} {value}")
    lines = list(extra or [])
    for name in sorted(families):
        if families[name]["type"]:
            lines.append(families[name]["type"])
        lines += families[name]["samples"]
    return "\n".join(lines) + "\n"


# -- the replica -----------------------------------------------------------------------------

def serve_cli():
    """The repository's serve.py module (its build_server is what every replica runs).
    Loaded from the checkout next to the `agent` package, because Serve starts
    replicas in worker processes whose sys.path need not hold the repository root."""
    if "serve" in sys.modules and hasattr(sys.modules["serve"], "build_server"):
        return sys.modules["serve"]
    import agent

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(agent.__file__))), "serve.py")
    spec = importlib.util.spec_from_file_location("nestvox_serve_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve_draining() -> bool:
    """Whether Serve has begun this replica's graceful shutdown. Serve keeps the
    flag on its replica object (`_shutting_down`) and offers no public hook before
    __del__, which runs only after the drain; read it where it is, and answer
    False if this Ray version keeps it elsewhere (Serve's own drain still holds)."""
    try:
        worker = ray._private.worker.global_worker
        actor = worker.actors.get(worker.actor_id)
        impl = getattr(actor, "_replica_impl", None)
        return bool(getattr(impl, "_shutting_down", False))
    except Exception:
        return False


app = FastAPI(title="nestvox on Ray Serve")


class _Request:  # what RealtimeServer.process_request reads from a request
    def __init__(self, path: str, headers):
        self.path, self.headers = path, headers


class _Refusal:  # RealtimeServer.process_request answers through connection.respond
    @staticmethod
    def respond(status, body):
        return status, body


@serve.deployment
@serve.ingress(app)
class NestvoxReplica:
    def __init__(self, args: dict):
        import torch

        self.args = argparse.Namespace(**args)
        level = getattr(logging, str(self.args.log_level).upper(), logging.INFO)
        logging.getLogger("nestvox").setLevel(level)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.started = time.time()
        self.server, self.streamer = serve_cli().build_server(self.args)
        self.server.start_engine()  # the engine thread and the TTS worker; Serve's proxy is the listener
        self.device = f"{self.streamer.device} {self.streamer.dtype} ({torch.get_num_threads()} torch threads)"
        self.node = ray.get_runtime_context().get_node_id()
        self.registry = serve.get_deployment_actor(REGISTRY)
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="nestvox-report", daemon=True)
        self._reporter.start()
        log.info("replica %s ready on node %s: %s", self.replica_id, self.node[:8], self.device)

    # -- reporting to the registry (a thread: reports must flow while the loop is busy)
    def entry(self) -> dict:
        health = self.server.health()
        return {"id": self.replica_id, "sessions": health["sessions"], "max_sessions": health["max_sessions"],
                "draining": serve_draining(), "node": self.node, "pid": os.getpid(), "device": self.device,
                "model": health["model"], "uptime_s": health["uptime_s"], "engine": health["engine"]}

    def _report(self) -> None:
        try:
            ray.get(self.registry.report.remote(self.replica_id, self.entry(), self.server.render_metrics()),
                    timeout=5)
        except Exception as exc:  # the registry was restarted by Serve: find the new one
            log.warning("report to the registry failed (%s): looking it up again", type(exc).__name__)
            try:
                self.registry = serve.get_deployment_actor(REGISTRY)
            except Exception:
                pass

    def _report_loop(self) -> None:
        while not self._stop.is_set():
            self._report()
            self._poke.wait(REPORT_PERIOD_S)
            self._poke.clear()

    def __del__(self):
        # Serve calls this after the drain (or at shutdown): leave the registry, stop the engine.
        stop = getattr(self, "_stop", None)
        if stop is None:
            return
        stop.set()
        self._poke.set()
        try:
            self.registry.remove.remote(self.replica_id)
        except Exception:
            pass
        self.server.engine.stop()

    def check_health(self):
        # Serve's periodic health check: a dead engine thread makes the replica unhealthy,
        # and Serve replaces it.
        thread = self.server.engine._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError("the engine thread is not running")

    # -- the realtime websocket -------------------------------------------------------------
    async def conversation(self, ws: WebSocket, route: str) -> None:
        from agent.realtime.protocol import ProtocolError

        # The route that matched, not ws.url.path: Serve's proxy may set an ASGI root_path.
        query = ws.scope.get("query_string", b"").decode("latin-1")
        path = route + (f"?{query}" if query else "")
        refusal = self.server.process_request(_Refusal, _Request(path, ws.headers))
        if refusal is not None:  # wrong token (401) or foreign Origin (403), as the websockets listener does
            status, body = refusal
            try:
                await ws.send_denial_response(PlainTextResponse(body, status_code=int(status)))
            except RuntimeError:  # the server in front does not relay HTTP denials: a policy close
                await ws.close(1008, body.strip()[:120])
            return
        await ws.accept()
        sock = StarletteSocket(ws)
        if serve_draining():
            self.server.metrics.inc("nestvox_sessions_rejected_total", reason="draining")
            await sock.send(json.dumps(ProtocolError(
                "server_full", "this replica is draining (being removed): reconnect").event()))
            await sock.close(1013, "replica draining")
            return
        self._poke.set()
        try:
            await self.server.serve_connection(sock, path, ws.headers)
        finally:
            await sock.close(1000, "")
            self._poke.set()

    @app.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket) -> None:
        await self.conversation(ws, "/v1/realtime")

    @app.websocket("/")
    async def realtime_root(self, ws: WebSocket) -> None:
        await self.conversation(ws, "/")

    # -- the whole application's status -----------------------------------------------------
    async def replicas(self) -> Dict[str, tuple]:
        snapshot = await self.registry.snapshot.remote()
        snapshot[self.replica_id] = (0.0, self.entry(), self.server.render_metrics())  # this one, live
        return snapshot

    @app.get("/healthz")
    async def healthz(self):
        try:
            snapshot = await self.replicas()
        except Exception as exc:
            return JSONResponse({"status": "error", "error": f"registry unreachable: {exc}"}, status_code=503)
        replicas = []
        for rid in sorted(snapshot):
            age, entry, _ = snapshot[rid]
            replicas.append({**entry, "report_age_s": age})
        live = [r for r in replicas if not r["draining"]]
        body = {"status": "ok" if live else "draining", "model": self.server.model_name,
                "sessions": sum(r["sessions"] for r in replicas),
                "max_sessions": sum(r["max_sessions"] for r in live),
                "has_room": any(r["sessions"] < r["max_sessions"] for r in live),
                "replicas": replicas, "serve": await self.serve_view()}
        return JSONResponse(body)

    async def serve_view(self) -> dict:
        """Serve's own count of this deployment's replicas by state (RUNNING, STARTING,
        STOPPING ...): it sees replicas that have not reported yet."""
        def status():
            ctx = serve.get_replica_context()
            app_status = serve.status().applications[ctx.app_name]
            deployment = app_status.deployments[ctx.deployment]
            return {"application": str(app_status.status), "deployment": str(deployment.status),
                    "replica_states": {str(k): v for k, v in deployment.replica_states.items()}}

        try:
            return await asyncio.get_running_loop().run_in_executor(None, status)
        except Exception as exc:
            return {"error": str(exc)}

    @app.get("/metrics")
    async def metrics(self):
        snapshot = await self.replicas()
        text = merge_metrics({rid: m for rid, (_, _, m) in snapshot.items()},
                             ["# TYPE nestvox_replicas gauge", f"nestvox_replicas {len(snapshot)}"])
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/client")
    async def client(self):
        from agent.realtime.server import browser_page

        page = browser_page()
        if page is None:
            return PlainTextResponse("the browser client is not installed\n", status_code=404)
        return HTMLResponse(page)


# -- the application -----------------------------------------------------------------------------

def replica_options(args) -> dict:
    """Serve deployment options from serve.py's flags."""
    device = str(args.device)
    resources = {"num_cpus": args.replica_cpus}
    if device.startswith("cuda"):
        resources["num_gpus"] = args.replica_gpus
    options = dict(
        ray_actor_options=resources,
        max_ongoing_requests=args.max_sessions + HEADROOM,
        # A drain waits for live conversations, checked each second, up to --drain-timeout-s;
        # then Serve kills the replica and its callers see a fault close.
        graceful_shutdown_wait_loop_s=1.0,
        graceful_shutdown_timeout_s=args.drain_timeout_s,
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
        request_router_config=RequestRouterConfig(request_router_class=LeastSessionsRouter),
        deployment_actors=[DeploymentActorConfig(name=REGISTRY, actor_class=ray.remote(Registry),
                                                 actor_options={"num_cpus": 0})],
    )
    if args.min_replicas is not None or args.max_replicas is not None:
        low = args.min_replicas if args.min_replicas is not None else 1
        high = args.max_replicas if args.max_replicas is not None else max(args.replicas, low)
        if not 0 <= low <= high or high < 1:
            raise SystemExit(f"error: need 0 <= --min-replicas ({low}) <= --max-replicas ({high}), max >= 1")
        target = args.target_sessions or max(1.0, 0.75 * args.max_sessions)
        options["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": high, "initial_replicas": min(max(args.replicas, low), high),
            # ongoing requests are sessions: scale out before replicas fill up
            "target_ongoing_requests": target,
            "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s,
        }
    else:
        options["num_replicas"] = args.replicas
    return options


def build_app(args):
    args_dict = {k: v for k, v in vars(args).items()}
    return NestvoxReplica.options(**replica_options(args)).bind(args_dict)


def deploy(args, blocking_timeout_s: float = 600.0) -> str:
    """Start Serve (HTTP on --host/--port) and the application; returns the websocket URL.
    Ray must be initialized (serve.py's run() does it; tests call ray.init themselves)."""
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.time() + blocking_timeout_s
    while True:  # serve.run returns when the app is deployed; wait for RUNNING, say why not
        status = serve.status().applications.get(APP_NAME)
        if status is not None and str(status.status).endswith("RUNNING"):
            break
        if status is not None and str(status.status).endswith("DEPLOY_FAILED"):
            raise RuntimeError(f"the nestvox application failed to deploy: {status.message}")
        if time.time() > deadline:
            raise TimeoutError(f"the nestvox application is not running after {blocking_timeout_s:g} s")
        time.sleep(0.5)
    return f"ws://{args.host}:{args.port}/v1/realtime"


def run(args) -> None:
    """`python serve.py --replicas N ...`: until SIGINT/SIGTERM, then a graceful delete."""
    started_here = args.ray_address is None
    if started_here:  # a local Ray for this process only, sized by --ray-num-cpus (default: the machine)
        init_ray(num_cpus=args.ray_num_cpus, include_dashboard=False)
    else:
        init_ray(args.ray_address)
    try:
        url = deploy(args)
        how = (f"autoscaled {replica_options(args)['autoscaling_config']['min_replicas']}-"
               f"{replica_options(args)['autoscaling_config']['max_replicas']}"
               if args.min_replicas is not None or args.max_replicas is not None else f"{args.replicas}")
        print(f"nestvox on Ray Serve listening on {url}  ({how} replicas, {args.max_sessions} sessions each; "
              f"health: http://{args.host}:{args.port}/healthz)", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("shutting down: draining the replicas", flush=True)
        serve.delete(APP_NAME)  # graceful: each replica finishes its conversations (--drain-timeout-s)
    finally:
        if started_here:
            serve.shutdown()
            ray.shutdown()
