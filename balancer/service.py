"""
L{BalancerService}: ties selection, pool, proxy, checks, discovery and the
status endpoint together, listens, and reloads the configuration on
C{SIGHUP}.

Start-up is all or nothing: every listener is created in C{startService};
if one cannot be, the ones made are closed and L{StartupFailed} ends the
process with one line and a non-zero status.  A reload is all or nothing
too: the whole file is parsed and checked (every endpoint included) before
anything changes, and a reload that fails keeps everything as it was.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from balancer import config as configmod
from balancer.config import BalancerConfig, ConfigError
from balancer.discovery import RedisDiscovery
from balancer.listen import serverEndpoint
from balancer.pool import CheckSettings, Pool
from balancer.proxy import BalancerFactory
from balancer.selection import Selector
from balancer.status import statusSite


class StartupFailed(SystemExit, Exception):
    """
    The balancer cannot start (a listener cannot be created).  As a
    L{SystemExit} it ends the process with its message and status 1 and no
    traceback; as an L{Exception} twistd's daemonizing parent sees it and
    exits non-zero with the message.
    """

    __module__ = "balancer"  # shorter in twistd's one-line report


#: options a reload cannot change (they need a restart)
NOT_RELOADABLE = (
    "listen", "status", "redis", "redisPrefix", "discoveryInterval", "workers",
    "backlog", "leanDispatch",
)


def _reason(f: Failure) -> str:
    value = f.value
    inner = getattr(value, "socketError", None)  # CannotListenError
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    if isinstance(value, OSError) and value.strerror:
        return value.strerror
    text = str(value).strip() or type(value).__name__
    return text.splitlines()[0]


class BalancerService(service.MultiService):
    """
    @ivar ports: the listening ports once started (proxy ports first, then
        the status port if any).
    @ivar listening: fires with C{ports} once every port listens.
    @ivar workers: the L{balancer.workers.WorkerMonitor} when this is the
        first of several processes (C{--workers}), else C{None}.
    """

    log = Logger()

    def __init__(
        self,
        cfg: BalancerConfig,
        reactor: Any = None,
        cmdline: dict[str, Any] | None = None,
        reusePort: bool = False,
        handleSighup: bool = True,
        workerStatus: str | None = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config = cfg
        self.cmdline = cmdline or {}
        self.reusePort = reusePort
        self.handleSighup = handleSighup
        self.workerStatus = workerStatus
        self.workers: Any = None
        self.reloads = 0
        self.reloadFailures = 0
        self.lastReloadError: str | None = None
        self.leanDispatch = False
        self.selector = Selector(reactor, cfg.algorithm)
        self.pool = Pool(reactor, self.selector, CheckSettings.fromConfig(cfg), cfg.drainTimeout)
        self.factory = BalancerFactory(
            reactor, self.selector, cfg.connectTimeout, cfg.tries, cfg.proxyProtocol,
            cfg.proxyTimeout, cfg.halfClose,
        )
        self.factory.onFinished.append(self.pool.connectionEnded)
        self.pool.factory = self.factory
        self.pool.setSource("static", cfg.backends)
        self.discovery: RedisDiscovery | None = None
        if cfg.redis:
            self.discovery = RedisDiscovery(
                reactor, cfg.redis, cfg.redisPrefix, cfg.discoveryInterval,
                self._discovered,
            )
            self.discovery.setServiceParent(self)
        self.ports: list[Any] = []
        self.proxyPorts: list[Any] = []
        self.statusPort: Any = None
        self.workerStatusPort: Any = None
        self.listening: defer.Deferred[list[Any]] = defer.Deferred()
        self._oldSighup: Any = None

    # -- life cycle ------------------------------------------------------------

    def startService(self) -> None:
        self._installDispatch()
        try:
            self._listen()
        except StartupFailed:
            # (listening never fires: the process ends)
            self._uninstallDispatch()
            raise
        self.pool.start()
        super().startService()
        if self.handleSighup and hasattr(signal, "SIGHUP"):
            self._oldSighup = signal.signal(signal.SIGHUP, self._sighup)
        self.listening.callback(self.ports)

    def _installDispatch(self) -> None:
        if not self.config.leanDispatch:
            return
        from balancer import fastpoll

        self.leanDispatch = fastpoll.install(self.reactor)

    def _uninstallDispatch(self) -> None:
        if not self.leanDispatch:
            return
        from balancer import fastpoll

        fastpoll.uninstall(self.reactor)
        self.leanDispatch = False

    def _listenOne(self, description: str, factory: Any, what: str, **kw: Any) -> Any:
        """
        Listen on C{description} now; endpoints of the kinds the balancer
        takes answer synchronously.
        """
        try:
            endpoint = serverEndpoint(self.reactor, description, **kw)
            d = endpoint.listen(factory)
        except Exception as e:
            d = defer.fail(e)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:
            d.cancel()
            raise StartupFailed(f"cannot {what} on {description}: no answer")
        if isinstance(result[0], Failure):
            raise StartupFailed(f"cannot {what} on {description}: {_reason(result[0])}")
        return result[0]

    def _listen(self) -> None:
        cfg = self.config
        try:
            for description in cfg.listen:
                # plain tcp: listeners use the lean path when the reactor can
                # watch raw sockets (as it must for RawConnect)
                port = self._listenOne(
                    description, self.factory, "listen",
                    reusePort=self.reusePort, backlog=cfg.backlog,
                    lean=self.factory.rawConnect,
                )
                self.proxyPorts.append(port)
                self.ports.append(port)
                self.log.info("balancer listening on {addr}", addr=port.getHost())
            if cfg.status:
                self.statusPort = self._listenOne(
                    cfg.status, statusSite(self), "serve --status",
                    reusePort=False, backlog=50,
                )
                self.ports.append(self.statusPort)
                self.log.info("status endpoint on {addr}", addr=self.statusPort.getHost())
            if self.workerStatus:
                from balancer.status import snapshot
                from balancer.workers import statusDumpFactory

                self.workerStatusPort = self._listenOne(
                    self.workerStatus, statusDumpFactory(lambda: snapshot(self)),
                    "serve the worker status", reusePort=False, backlog=50,
                )
        except StartupFailed:
            # SystemExit prints the message (to twistd's log, and to the
            # terminal of a daemonizing twistd)
            for port in self.ports + [self.workerStatusPort]:
                if port is not None:
                    port.stopListening()
            self.ports, self.proxyPorts = [], []
            self.statusPort = self.workerStatusPort = None
            raise

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if self._oldSighup is not None:
            signal.signal(signal.SIGHUP, self._oldSighup)
            self._oldSighup = None
        ports, self.ports = self.ports, []
        if self.workerStatusPort is not None:
            ports.append(self.workerStatusPort)
            self.workerStatusPort = None
        self.proxyPorts = []
        self.statusPort = None
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        self.pool.stop()
        yield super().stopService()
        self.factory.closeAll()
        self._uninstallDispatch()

    # -- discovery ---------------------------------------------------------------

    def _discovered(self, specs: list[Any], logins: dict[str, int | None]) -> None:
        self.pool.setSource("redis", specs)
        for key, count in logins.items():
            peer = self.pool.peers.get(key)
            if peer is not None:
                peer.setLogins(count)

    # -- reload -----------------------------------------------------------------

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._onSighup)

    def _onSighup(self) -> None:
        self.log.info("SIGHUP: reloading {path}", path=self.config.configFile)
        self.reload()
        if self.workers is not None:
            self.workers.signalAll("HUP")

    def reload(self) -> bool:
        """
        Re-read the configuration file (the command line still wins) and
        apply it, all or nothing.  Returns C{False} and keeps the running
        configuration if the new one is invalid.
        """
        try:
            new = configmod.load(self.cmdline, self.config.configFile)
            self._checkEndpoints(new)
        except ConfigError as e:
            return self._reloadFailed(str(e))
        old = self.config
        try:
            self.apply(new)
        except Exception as e:
            self.log.failure("applying the new configuration")
            try:
                self.apply(old)
            except Exception:
                self.log.failure("restoring the running configuration")
            return self._reloadFailed(str(e) or type(e).__name__)
        self.reloads += 1
        return True

    def _reloadFailed(self, reason: str) -> bool:
        self.reloadFailures += 1
        self.lastReloadError = reason
        self.log.error(
            "reload failed: {reason} (keeping the running configuration)", reason=reason
        )
        return False

    def _checkEndpoints(self, cfg: BalancerConfig) -> None:
        """
        Build the client endpoint of every new backend with this reactor,
        as the pool will, so that applying cannot fail half-way.
        """
        from twisted.internet.endpoints import clientFromString

        for spec in cfg.backends:
            if spec.key in self.pool.peers or configmod.normalizeAddress(spec.address):
                continue
            try:
                clientFromString(self.reactor, spec.address)
            except Exception as e:
                raise ConfigError(f"bad backend address {spec.address!r}: {e}") from None

    def apply(self, new: BalancerConfig) -> None:
        old = self.config
        for name in NOT_RELOADABLE:
            if getattr(old, name) != getattr(new, name):
                self.log.warn("--{name} changed: needs a restart", name=configmod.optionName(name))
                setattr(new, name, getattr(old, name))
        # the one step that may still fail goes first
        self.pool.setSource("static", new.backends)
        self.selector.algorithm = new.algorithm
        self.factory.connectTimeout = new.connectTimeout
        self.factory.tries = new.tries
        self.factory.proxyProtocol = new.proxyProtocol
        self.factory.proxyTimeout = new.proxyTimeout
        self.factory.halfClose = new.halfClose
        self.pool.drainTimeout = new.drainTimeout
        self.pool.setChecks(CheckSettings.fromConfig(new))
        self.config = new
        self.log.info("configuration reloaded: {n} backends", n=len(self.pool.peers))
