"""
L{BalancerService}: ties selection, pool, proxy, checks, discovery and the
status endpoint together, and reloads the configuration on C{SIGHUP}.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from balancer import config as configmod
from balancer.config import BalancerConfig, ConfigError
from balancer.discovery import RedisDiscovery
from balancer.listen import server_endpoint
from balancer.pool import CheckSettings, Pool
from balancer.proxy import BalancerFactory
from balancer.selection import Selector
from balancer.status import status_site


def check_settings(cfg: BalancerConfig) -> CheckSettings:
    return CheckSettings(
        interval=cfg.check_interval,
        timeout=cfg.check_timeout,
        rise=cfg.rise,
        fall=cfg.fall,
        send=cfg.check_send,
        expect=cfg.check_expect,
        proxy_protocol=cfg.proxy_protocol,
        enabled=cfg.check_interval > 0,
    )


_NOT_RELOADABLE = ("listen", "status", "redis", "redis_prefix", "workers", "backlog")


class BalancerService(service.MultiService):
    """
    @ivar ports: the listening ports once started (proxy ports first, then
        the status port if any).
    @ivar listening: fires with C{ports} once every port listens.
    """

    log = Logger()

    def __init__(
        self,
        cfg: BalancerConfig,
        reactor: Any = None,
        cmdline: dict[str, Any] | None = None,
        reuse_port: bool = False,
        handle_sighup: bool = True,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config = cfg
        self.cmdline = cmdline or {}
        self.reuse_port = reuse_port
        self.handle_sighup = handle_sighup
        self.reloads = 0
        self.selector = Selector(reactor, cfg.algorithm)
        self.pool = Pool(reactor, self.selector, check_settings(cfg), cfg.drain_timeout)
        self.factory = BalancerFactory(
            reactor, self.selector, cfg.connect_timeout, cfg.tries, cfg.proxy_protocol
        )
        self.factory.on_finished.append(self.pool.connection_ended)
        self.pool.factory = self.factory
        self.pool.set_source("static", cfg.backends)
        self.discovery: RedisDiscovery | None = None
        if cfg.redis:
            self.discovery = RedisDiscovery(
                reactor, cfg.redis, cfg.redis_prefix, cfg.discovery_interval,
                self._discovered,
            )
            self.discovery.setServiceParent(self)
        self.ports: list[Any] = []
        self.proxy_ports: list[Any] = []
        self.status_port: Any = None
        self.listening: defer.Deferred[list[Any]] = defer.Deferred()
        self._old_sighup: Any = None
        self.sighup_hooks: list[Any] = []

    # -- life cycle ------------------------------------------------------------

    def startService(self) -> None:
        self.pool.start()
        super().startService()
        if self.handle_sighup and hasattr(signal, "SIGHUP"):
            self._old_sighup = signal.signal(signal.SIGHUP, self._sighup)
        self._listen().addErrback(self._listen_failed)

    @defer.inlineCallbacks
    def _listen(self) -> Any:
        cfg = self.config
        for description in cfg.listen:
            # plain tcp: listeners use the lean path when the reactor can
            # watch raw sockets (as it must for RawConnect)
            endpoint = server_endpoint(
                self.reactor, description, self.reuse_port, cfg.backlog,
                lean=self.factory.raw_connect,
            )
            port = yield endpoint.listen(self.factory)
            self.proxy_ports.append(port)
            self.ports.append(port)
            self.log.info("balancer listening on {addr}", addr=port.getHost())
        if cfg.status:
            endpoint = server_endpoint(self.reactor, cfg.status, False, 50)
            self.status_port = yield endpoint.listen(status_site(self))
            self.ports.append(self.status_port)
            self.log.info("status endpoint on {addr}", addr=self.status_port.getHost())
        self.listening.callback(self.ports)

    def _listen_failed(self, f: Any) -> None:
        self.log.failure("cannot listen", f)
        if not self.listening.called:
            self.listening.errback(f)
        else:  # pragma: no cover
            pass
        if self.running and getattr(self.reactor, "running", False):
            self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if self._old_sighup is not None:
            signal.signal(signal.SIGHUP, self._old_sighup)
            self._old_sighup = None
        ports, self.ports = self.ports, []
        self.proxy_ports = []
        self.status_port = None
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        self.pool.stop()
        yield super().stopService()
        self.factory.close_all()

    # -- discovery ---------------------------------------------------------------

    def _discovered(self, specs: list[Any], logins: dict[str, int | None]) -> None:
        self.pool.set_source("redis", specs)
        for key, count in logins.items():
            peer = self.pool.peers.get(key)
            if peer is not None:
                peer.set_logins(count)

    # -- reload -----------------------------------------------------------------

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._on_sighup)

    def _on_sighup(self) -> None:
        self.log.info("SIGHUP: reloading {path}", path=self.config.config_file)
        self.reload()
        for hook in self.sighup_hooks:
            hook()

    def reload(self) -> bool:
        """
        Re-read the configuration file (the command line still wins) and
        apply it.  Returns C{False} and keeps the running configuration if
        the new one is invalid.
        """
        try:
            new = configmod.load(self.cmdline, self.config.config_file)
        except ConfigError as e:
            self.log.error("reload failed, keeping the running configuration: {e}", e=e)
            return False
        self.apply(new)
        return True

    def apply(self, new: BalancerConfig) -> None:
        old = self.config
        for name in _NOT_RELOADABLE:
            if getattr(old, name) != getattr(new, name):
                self.log.warn("--{name} changed: needs a restart", name=name.replace("_", "-"))
                setattr(new, name, getattr(old, name))
        if new.algorithm != old.algorithm:
            self.selector.algorithm = new.algorithm
        self.factory.connect_timeout = new.connect_timeout
        self.factory.tries = new.tries
        self.factory.proxy_protocol = new.proxy_protocol
        self.pool.drain_timeout = new.drain_timeout
        self.pool.set_checks(check_settings(new))
        self.pool.set_source("static", new.backends)
        self.config = new
        self.reloads += 1
        self.log.info(
            "configuration reloaded: {n} backends", n=len(self.pool.peers)
        )
