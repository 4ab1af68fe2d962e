"""
Helpers for the tests of the cluster parts: throwaway MariaDB databases,
private redis-server and twistd processes, free ports, condition polling.

Everything here talks to real servers: MariaDB at 127.0.0.1:3306 (root,
no password) and Redis at 127.0.0.1:6379, or private instances it starts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote, unquote, urlsplit

import pymysql
from twisted.internet import defer, reactor, task

from chatproto.common.sentinel import encodeCommand


def _mysqlSettings():
    """CHAT_TEST_MYSQL_URL (mysql://user:pass@host:port/, as .ci/run sets
    it) or root without a password at 127.0.0.1:3306."""
    parts = urlsplit(os.environ.get("CHAT_TEST_MYSQL_URL") or "mysql://root@127.0.0.1:3306/")
    return (
        parts.hostname or "127.0.0.1",
        parts.port or 3306,
        unquote(parts.username or "root"),
        unquote(parts.password or ""),
    )


MYSQL_HOST, MYSQL_PORT, MYSQL_USER, MYSQL_PASSWORD = _mysqlSettings()
REDIS_HOST = os.environ.get("CHAT_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CHAT_TEST_REDIS_PORT", "6379"))
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def uniqueName(kind: str) -> str:
    return f"chattest_{kind}_{os.getpid()}_{secrets.token_hex(4)}"


def mysqlConnect(**kw):
    args = dict(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD, charset="utf8mb4")
    args.update(kw)
    return pymysql.connect(**args)


def mysqlURL(database: str, port: int | None = None) -> str:
    auth = quote(MYSQL_USER, safe="") + (f":{quote(MYSQL_PASSWORD, safe='')}" if MYSQL_PASSWORD else "")
    return f"mysql://{auth}@{MYSQL_HOST}:{port or MYSQL_PORT}/{database}"


def dropDatabase(database: str, port: int | None = None) -> None:
    connection = mysqlConnect(port=port or MYSQL_PORT)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{database}`")
    finally:
        connection.close()


def killConnections(database: str) -> int:
    """Kill, server-side, every connection using C{database}; how many."""
    connection = mysqlConnect()
    killed = 0
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
                (database,),
            )
            for (pid,) in cursor.fetchall():
                try:
                    cursor.execute(f"KILL CONNECTION {int(pid)}")
                    killed += 1
                except pymysql.err.MySQLError:
                    pass
    finally:
        connection.close()
    return killed


def freePort() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def until(predicate, timeout: float = 10.0, interval: float = 0.02, clock=reactor, what: str = "condition"):
    """
    A Deferred that fires with C{predicate()}'s first true value, polling
    every C{interval} seconds; fails with C{AssertionError} after
    C{timeout}.  C{predicate} may return a Deferred.
    """

    async def poll():
        deadline = time.monotonic() + timeout
        while True:
            value = await defer.maybeDeferred(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await task.deferLater(clock, interval, lambda: None)

    return defer.Deferred.fromCoroutine(poll())


def sleep(seconds: float, clock=reactor) -> defer.Deferred:
    """Yield to the reactor (only for tiny pauses between polls)."""
    return task.deferLater(clock, seconds, lambda: None)


# --- private processes -----------------------------------------------------


class Process:
    """A child process started by a test and stopped by its pid."""

    def __init__(self, argv, logPath: str, env=None, cwd=None) -> None:
        self.argv = argv
        self.logPath = logPath
        self.log = open(logPath, "ab")
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def terminate(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after C{timeout}; reap."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        with open(self.logPath, "rb") as f:
            return f.read().decode("utf-8", "replace")


def canConnect(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


class RedisServer:
    """A private redis-server on a free port, without persistence."""

    def __init__(self, directory: str | None = None, port: int | None = None) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="chat-redis-")
        self.port = port or freePort()
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> defer.Deferred:
        argv = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--daemonize", "no",
            *self.extraArgs,
        ]  # fmt: skip
        self.process = Process(argv, os.path.join(self.directory, "redis.log"))
        return until(lambda: canConnect("127.0.0.1", self.port), 10, what="redis-server to listen")

    #: more redis-server arguments
    extraArgs: tuple = ()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process = None

    def cleanup(self) -> None:
        """Kill it and remove its directory."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def twistdChat(args, logPath: str) -> Process:
    """C{twistd -n chat ARGS} in a child process, this repo's chatproto first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    argv = [twistd, "-n", "--pidfile=", "--logfile=-", "chat", *args]
    return Process(argv, logPath, env=env, cwd=os.path.dirname(logPath))


# --- a blocking Redis client for test assertions ---------------------------


class SyncRedis:
    """A minimal blocking RESP client: what tests need to look at keys."""

    def __init__(self, host: str = REDIS_HOST, port: int = REDIS_PORT) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __call__(self, *args):
        self.sock.sendall(encodeCommand(*args))
        return self._read()

    def _read(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)[:-2]
            return data.decode("utf-8", "replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise ValueError(f"bad RESP line {line!r}")

    def deletePrefix(self, prefix: str) -> int:
        cursor, deleted = "0", 0
        while True:
            cursor, keys = self("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            if keys:
                deleted += self("DEL", *keys)
            if cursor == "0":
                return deleted


def deleteRedisPrefix(prefix: str, port: int = REDIS_PORT) -> None:
    r = SyncRedis(port=port)
    try:
        r.deletePrefix(prefix)
    finally:
        r.close()


def uniquePrefix() -> str:
    return f"chattest:{os.getpid()}:{secrets.token_hex(4)}:"


REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


def useFreshCluster(testCase) -> None:
    """
    Give C{testCase} a database name and a Redis prefix of its own (both
    removed at cleanup) and a L{SyncRedis} as C{testCase.redis}.
    """
    testCase.database = uniqueName("db")
    testCase.prefix = uniquePrefix()
    testCase.addCleanup(dropDatabase, testCase.database)
    testCase.addCleanup(deleteRedisPrefix, testCase.prefix)
    testCase.redis = SyncRedis()
    testCase.addCleanup(testCase.redis.close)


def clusterChatArgs(port: int, name: str, db: str, redisURL: str, prefix: str) -> list[str]:
    """The C{twistd chat} arguments of a cluster member for the tests."""
    return [
        "--port", f"tcp:{port}:interface=127.0.0.1",
        "--name", name,
        "--db", db,
        "--redis", redisURL,
        "--redis-prefix", prefix,
        "--scrypt-n", "16",
    ]  # fmt: skip


# --- a private MariaDB -----------------------------------------------------

MARIADBD = shutil.which("mariadbd") or shutil.which("mysqld") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db") or "/usr/bin/mariadb-install-db"


class MariaDBServer:
    """
    A private mariadbd (its own data directory, a free port, no grant
    tables: root without a password), to stop and restart by pid.
    """

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="chat-mariadb-")
        self.datadir = os.path.join(self.directory, "data")
        self.port = freePort()
        self.process: Process | None = None
        self._installed = False

    def install(self) -> None:
        # A private tmpdir: bootstraps running at once in the shared /tmp
        # trip over each other's temporary tables ("Unknown table
        # mysql.tmp_user_sys").
        tmpdir = os.path.join(self.directory, "tmp")
        os.makedirs(tmpdir, exist_ok=True)
        subprocess.run(
            [
                INSTALL_DB, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
                "--auth-root-authentication-method=normal", "--skip-test-db", f"--tmpdir={tmpdir}",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120,
            env=dict(os.environ, TMPDIR=tmpdir),
        )  # fmt: skip
        self._installed = True

    def start(self) -> defer.Deferred:
        if not self._installed:
            self.install()
        argv = [
            MARIADBD, "--no-defaults", f"--datadir={self.datadir}",
            f"--socket={os.path.join(self.directory, 'mysqld.sock')}",
            f"--pid-file={os.path.join(self.directory, 'mysqld.pid')}",
            f"--port={self.port}", "--bind-address=127.0.0.1", "--user=root",
            f"--tmpdir={os.path.join(self.directory, 'tmp')}",
            "--skip-grant-tables", "--skip-log-bin", "--innodb-buffer-pool-size=16M",
        ]  # fmt: skip
        self.process = Process(argv, os.path.join(self.directory, "server.log"))

        def ready():
            try:
                pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=1).close()
                return True
            except pymysql.err.MySQLError:
                if not self.process.alive():
                    raise RuntimeError("mariadbd exited:\n" + self.process.output()[-2000:])
                return False

        return until(ready, 30, interval=0.05, what="the private mariadbd")

    def url(self, database: str) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


# --- a private replicated Redis with Sentinel -----------------------------


class RedisReplica(RedisServer):
    """A private redis-server replicating C{master} (a L{RedisServer})."""

    def __init__(self, master: RedisServer, directory: str | None = None) -> None:
        super().__init__(directory)
        self.master = master

    @property
    def extraArgs(self) -> tuple:
        return ("--replicaof", "127.0.0.1", str(self.master.port))


class RedisSentinel:
    """
    A private sentinel (C{redis-server --sentinel}) watching C{master} under
    the name C{name}, with fast failover settings (down after 500 ms,
    failover timeout 2 s, quorum 2 of 3).
    """

    def __init__(self, master: RedisServer, name: str = "mymaster", quorum: int = 2) -> None:
        self.directory = tempfile.mkdtemp(prefix="chat-sentinel-")
        self.port = freePort()
        self.master = master
        self.name = name
        self.quorum = quorum
        self.process: Process | None = None

    def start(self) -> defer.Deferred:
        config = os.path.join(self.directory, "sentinel.conf")
        with open(config, "w") as f:
            f.write(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.directory}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.name} 500\n"
                f"sentinel failover-timeout {self.name} 2000\n"
                f"sentinel parallel-syncs {self.name} 1\n"
            )
        self.process = Process([REDIS_SERVER, config, "--sentinel"], os.path.join(self.directory, "sentinel.log"))
        return until(lambda: canConnect("127.0.0.1", self.port), 10, what="the sentinel to listen")

    def master_address(self):
        r = SyncRedis(port=self.port)
        try:
            return r("SENTINEL", "get-master-addr-by-name", self.name)
        finally:
            r.close()

    def cleanup(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


class SentinelGroup:
    """A private master, one replica and three sentinels; L{url} is the
    C{redis+sentinel://} URL the chat servers use."""

    def __init__(self, name: str = "mymaster") -> None:
        self.name = name
        self.master = RedisServer()
        # The replica's first sync starts at once (the default waits 5 s).
        self.master.extraArgs = ("--repl-diskless-sync-delay", "0")
        self.replica = RedisReplica(self.master)
        self.sentinels = [RedisSentinel(self.master, name) for _ in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.name}"

    async def start(self) -> None:
        await self.master.start()
        await self.replica.start()

        def replicated():
            r = SyncRedis(port=self.master.port)
            try:
                return "state=online" in r("INFO", "replication")
            finally:
                r.close()

        await until(replicated, 20, interval=0.05, what="the replica's first sync")
        for s in self.sentinels:
            await s.start()

        def allSeeTheReplica():
            for s in self.sentinels:
                r = SyncRedis(port=s.port)
                try:
                    info = r("SENTINEL", "master", self.name)
                finally:
                    r.close()
                fields = dict(zip(info[::2], info[1::2]))
                if fields.get("num-slaves") != "1" or fields.get("num-other-sentinels") != "2":
                    return False
            return True

        await until(allSeeTheReplica, 30, interval=0.1, what="the sentinels to see each other and the replica")

    def currentMaster(self) -> int | None:
        """The port the sentinels name as master (the first that answers)."""
        for s in self.sentinels:
            try:
                host, port = s.master_address()
                return int(port)
            except (OSError, ConnectionError, TypeError, ValueError):
                continue
        return None

    def cleanup(self) -> None:
        for s in self.sentinels:
            s.cleanup()
        self.replica.cleanup()
        self.master.cleanup()
