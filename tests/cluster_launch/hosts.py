"""Machines for `ray up` on this one computer: network, mount, PID and UTS namespaces, each running an sshd.

Each host is a network namespace on a private bridge (`distlt0`, 10.77.0.1/24 on this machine's side; the hosts
have the loopback and their own 10.77.0.x address, no route anywhere else), whose sshd runs in its own mount,
PID and UTS namespaces, so that, as on separate machines:

- `/tmp`, `/dev/shm` and `/run` are private tmpfs mounts: two raylets never share Ray's temp directory;
- the SSH user (`distci`, which exists only inside the hosts: their `/etc/passwd` is a bind mount) has a home of
  its own on each host (`/home/distci`, a bind mount of `<run dir>/hosts/<name>/home`), so `~/dist-venv`,
  `~/.bashrc`, `~/.ray/auth_token` and `~/mlflow` are per host;
- `ps`, `ray stop` and psutil see only the host's own processes (a PID namespace with its own /proc), so a
  `ray stop` on one host cannot end another host's Ray, nor anything else running on this computer;
- `hostname` is the host's name; `/etc/hosts` lists every host.

Everything else (the root filesystem, /var/tmp, the wheelhouse) is shared, like an NFS mount would be.
Killing a host's sshd (PID 1 of its PID namespace) ends every process on that host; `Hosts.down()` does that
for every host and deletes the namespaces, the veth pairs and the bridge, and reports what it found left.
Nothing here touches an interface, namespace or process it did not create; it needs root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "distlt"  # every netns, veth and the bridge carry it; cleanup only ever touches these names
BRIDGE = f"{PREFIX}0"
SUBNET = "10.77.0"
BRIDGE_IP = f"{SUBNET}.1"
USER = "distci"
UID = GID = 47321
USER_HOME = f"/home/{USER}"
MARKER = "DIST_CLUSTER_LAUNCH_TEST"  # in the environment of every process this module starts on this machine
SSHD = "/usr/sbin/sshd"


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def ensure_tools(log=print) -> None:
    """sshd, ssh, rsync (the launcher syncs file_mounts with it, on this machine and on the head) and ssh-keygen."""
    missing = [pkg for tool, pkg in (("/usr/sbin/sshd", "openssh-server"), ("/usr/bin/rsync", "rsync"),
                                     ("/usr/bin/ssh", "openssh-client"), ("/usr/bin/ssh-keygen", "openssh-client"))
               if not Path(tool).exists()]
    if missing:
        log(f"[hosts] apt-get install {' '.join(sorted(set(missing)))}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        # policy-rc.d (present in container images) keeps the package from starting an sshd on this machine.
        subprocess.run(["apt-get", "install", "-y", "-qq", *sorted(set(missing))], check=True, env=env)


@dataclass
class Host:
    name: str
    ip: str
    dir: Path
    proc: subprocess.Popen | None = None
    netns_inode: int = 0
    log: Path = field(init=False)

    def __post_init__(self):
        self.log = self.dir / "sshd.log"

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def home(self) -> Path:
        """This host's home of the SSH user, as seen from this machine."""
        return self.dir / "home"

    def init_pid(self) -> int | None:
        """Host PID of the sshd that is PID 1 of this host's PID namespace (the child of `unshare`)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def pid_namespace(self) -> str | None:
        pid = self.init_pid()
        try:
            return os.readlink(f"/proc/{pid}/ns/pid") if pid else None
        except OSError:
            return None


def _live_processes(selects) -> list[tuple[int, str]]:
    """(pid, command line) of every live (non-zombie) process other than this one whose /proc entry `selects`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if not selects(entry) or (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            found.append((int(entry.name), cmd))
        except (OSError, IndexError):
            continue
    return found


def _processes_in(netns_inodes: set[int]) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose network namespace is one of these."""
    return _live_processes(lambda entry: os.stat(entry / "ns" / "net").st_ino in netns_inodes)


def _marked_processes() -> list[tuple[int, str]]:
    needle = f"{MARKER}=".encode()
    return _live_processes(lambda entry: any(var.startswith(needle)
                                             for var in (entry / "environ").read_bytes().split(b"\0")))


def _our_netns() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}-")]


def _link_exists(name: str) -> bool:
    return _run("ip", "link", "show", "dev", name, check=False).returncode == 0


def clean_stale(log=print) -> None:
    """Remove what an earlier run that was killed before its cleanup left: our namespaces (and every process in
    them), our veths and our bridge. Only names starting with PREFIX are touched."""
    names = _our_netns()
    inodes = set()
    for ns in names:
        try:
            inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
        except OSError:
            pass
    stale = _processes_in(inodes)
    for pid, cmd in stale:
        log(f"[hosts] killing stale process {pid} ({cmd[:100]}) in a {PREFIX} namespace")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for ns in names:
        log(f"[hosts] deleting stale namespace {ns}")
        _run("ip", "netns", "del", ns, check=False)
    out = _run("ip", "-o", "link", "show", check=False).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX):
            log(f"[hosts] deleting stale link {name}")
            _run("ip", "link", "del", name, check=False)


class Hosts:
    """A bridge and one namespace-host per name; `up()` starts them, `down()` removes every trace."""

    def __init__(self, root: Path, names: list[str], authorized_key: str, log=print):
        self.root = root
        self.log = log
        self.authorized_key = authorized_key
        self.hosts = [Host(name, f"{SUBNET}.{10 + i}", root / "hosts" / name) for i, name in enumerate(names)]
        self.etc = root / "etc"
        self._bridge_made = False

    def __iter__(self):
        return iter(self.hosts)

    # -- setup --------------------------------------------------------------------------------------------------
    def _write_etc(self) -> None:
        """passwd/group with the SSH user added, and an /etc/hosts naming every host, bind-mounted in each."""
        self.etc.mkdir(parents=True)
        passwd = Path("/etc/passwd").read_text().rstrip("\n").splitlines()
        passwd = [line for line in passwd if not line.startswith(f"{USER}:")]
        passwd.append(f"{USER}:x:{UID}:{GID}:DiST cluster launch test:{USER_HOME}:/bin/bash")
        (self.etc / "passwd").write_text("\n".join(passwd) + "\n")
        group = [line for line in Path("/etc/group").read_text().splitlines() if not line.startswith(f"{USER}:")]
        group.append(f"{USER}:x:{GID}:")
        (self.etc / "group").write_text("\n".join(group) + "\n")
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{BRIDGE_IP}\tlaptop"]
        lines += [f"{h.ip}\t{h.name}" for h in self.hosts]
        (self.etc / "hosts").write_text("\n".join(lines) + "\n")
        for f in ("passwd", "group", "hosts"):
            (self.etc / f).chmod(0o644)

    def _prepare_host(self, host: Host) -> None:
        host.home.mkdir(parents=True)
        # A fresh account, as `useradd -m` makes it: the skeleton files (Debian's .bashrc, .profile).
        for item in Path("/etc/skel").iterdir():
            if item.is_file():
                shutil.copy2(item, host.home / item.name)
        ssh_dir = host.home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_text(self.authorized_key.strip() + "\n")
        (ssh_dir / "authorized_keys").chmod(0o600)
        for path in [host.home, *host.home.rglob("*")]:
            os.chown(path, UID, GID, follow_symlinks=False)
        host.home.chmod(0o755)
        key = host.dir / "ssh_host_ed25519_key"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{host.name}-host", "-f", str(key))
        (host.dir / "sshd_config").write_text("\n".join([
            "Port 22",
            "ListenAddress 0.0.0.0",  # inside the namespace: its loopback and its 10.77.0.x address only
            f"HostKey {key}",
            "PidFile none",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PermitRootLogin no",
            f"AllowUsers {USER}",
            "StrictModes yes",
            "AllowTcpForwarding yes",  # `ray dashboard` and `ray attach -p` tunnel through it
            "X11Forwarding no",
            "PrintMotd no",
            "MaxStartups 100:30:200",  # the launcher opens many connections at once
            "MaxSessions 100",
            "Subsystem sftp internal-sftp",
            "LogLevel INFO",
            "",
        ]))

    def _start_host(self, host: Host) -> None:
        host.dir.mkdir(parents=True, exist_ok=True)
        _run("ip", "netns", "add", host.netns)
        host.netns_inode = os.stat(f"/run/netns/{host.netns}").st_ino
        outer, inner = f"{PREFIX}-{host.name}", f"{PREFIX}-{host.name}i"
        outer, inner = outer[:15], inner[:15]
        _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        _run("ip", "link", "set", outer, "master", BRIDGE, "up")
        _run("ip", "link", "set", inner, "netns", host.netns)
        _run("ip", "-n", host.netns, "link", "set", inner, "name", "eth0")
        _run("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _run("ip", "-n", host.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", host.netns, "link", "set", "lo", "up")
        script = "\n".join([
            "set -e",
            f"hostname {host.name}",
            "mount -t tmpfs -o mode=1777 tmpfs /tmp",
            "mount -t tmpfs -o mode=1777 tmpfs /dev/shm",
            "mount -t tmpfs -o mode=755 tmpfs /run",
            "mkdir -m 755 /run/sshd",
            f"mount --bind {self.etc / 'passwd'} /etc/passwd",
            f"mount --bind {self.etc / 'group'} /etc/group",
            f"mount --bind {self.etc / 'hosts'} /etc/hosts",
            "mount -t tmpfs -o mode=755 tmpfs /home",
            f"mkdir -m 755 {USER_HOME}",
            f"mount --bind {host.home} {USER_HOME}",
            f"exec {SSHD} -D -e -f {host.dir / 'sshd_config'}",
        ])
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", MARKER: self.root.name}
        with host.log.open("w") as out:
            host.proc = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc",
                 "--propagation", "private", "sh", "-c", script],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def _wait_for_sshd(self, host: Host, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection((host.ip, 22), timeout=2) as conn:
                    if conn.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if host.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd of {host.name} did not come up (exit {host.proc.poll()}):\n"
                                   f"{host.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def up(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self._write_etc()
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._bridge_made = True
        _run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for host in self.hosts:
            self._prepare_host(host)
            self._start_host(host)
        for host in self.hosts:
            self._wait_for_sshd(host)
            self.log(f"[hosts] {host.name}: {host.ip}, sshd pid {host.init_pid()} (PID 1 of its namespace)")

    # -- inspection ---------------------------------------------------------------------------------------------
    def processes(self, host: Host) -> list[tuple[int, str]]:
        """Every process on one host (its network namespace), sshd included."""
        return _processes_in({host.netns_inode})

    def leftovers(self) -> list[str]:
        """Processes of ours still alive anywhere: in our namespaces, or carrying our marker."""
        procs = dict(_processes_in({h.netns_inode for h in self.hosts if h.netns_inode}))
        procs.update(_marked_processes())
        return [f"{pid} {cmd[:160]}" for pid, cmd in sorted(procs.items())]

    # -- teardown -----------------------------------------------------------------------------------------------
    def down(self) -> list[str]:
        """End every process on every host, delete namespaces, veths and the bridge. Returns what is left of
        them (processes, namespaces, links): empty when the cleanup worked."""
        for host in self.hosts:
            pid = host.init_pid()
            if pid:  # PID 1 of the namespace: the kernel kills every other process in it with it
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            alive = _processes_in({h.netns_inode for h in self.hosts if h.netns_inode})
            for pid, _ in alive:  # anything that joined a namespace from outside (e.g. `ip netns exec` by hand)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not alive:
                break
            time.sleep(0.5)
        for host in self.hosts:
            if host.proc is not None:
                try:
                    host.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    host.proc.kill()
        left = self.leftovers()
        for host in self.hosts:
            if Path(f"/run/netns/{host.netns}").exists():
                _run("ip", "netns", "del", host.netns, check=False)
            outer = f"{PREFIX}-{host.name}"[:15]
            if _link_exists(outer):  # normally gone with its peer in the namespace
                _run("ip", "link", "del", outer, check=False)
        if self._bridge_made and _link_exists(BRIDGE):
            _run("ip", "link", "del", BRIDGE, check=False)
        left += [f"netns {ns}" for ns in _our_netns()]
        left += [f"link {h}" for h in [BRIDGE] + [f"{PREFIX}-{h.name}"[:15] for h in self.hosts] if _link_exists(h)]
        return left
