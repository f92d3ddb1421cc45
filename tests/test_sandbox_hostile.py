"""Hostile code against the python tool's sandbox, run by a trainer that is root and by one that
is an unprivileged user, with the host checked after every case.

Each variant is one runner process (this file run as a script) playing the trainer: fake secrets
in its environment (HF_TOKEN, WANDB_API_KEY) and on its command line, a run folder with
checkpoints/latest, a home with ~/.ssh/id_rsa, a root-only secret file, and TCP, UDP, AF_UNIX
(path and abstract) listeners on the host. It runs every case through the real tool and, after
each, checks: the call returned in time and did not raise; no secret and no `ESCAPED` marker in the
tool's output (cases print `ESCAPED` when an attack step that must fail succeeded); no listener was
reached; the canary folders (run folder, home, the venv's site-packages) are unchanged; a benign
call still gives the right answer; and no process is left (the runner is a child subreaper, so an
escaped process would be re-parented to it). A case whose attack would kill the trainer shows up
as a runner that stopped reporting. Host-wide side effects are guarded inside the cases (e.g.
`kill(-1)` only runs when the code is in its own pid namespace, a fork bomb only when a first fork
failed) so that a broken sandbox fails the test instead of the machine.

The unprivileged variant runs as uid 61234 (no passwd entry needed) through `setpriv`, in a
private mount namespace where the interpreter under /root (mode 0700) is made reachable by bind
mounts: the setting of a trainer that can read its own venv. Both variants run concurrently.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

UNPRIV_UID = 61234
WALL_S = 1.5
SLOW_WALL_S = 10.0
FAKE_HF = "hf_FAKEtokenAXPO0123456789abcdef"
FAKE_WANDB = "wandbFAKEkeyAXPO9876543210fedcba"

# Every case first switches off the old design's in-process audit hook the way the red team did
# (finding H1), so the suite measures the OS boundary only; in the bwrap sandbox it is a no-op.
PRE = """import __main__, os, sys
__main__._in_hook = True
def ESC(*m):
    print('ESCAPED', *m, flush=True)
def W(path, data='pwned', mode='w'):
    with open(path, mode) as f:   # raises if the write or the close fails (no silent buffering)
        f.write(data)
def libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)
"""


def case(name, code, *, kinds=None, forbid=(), slow=False, max_s=None):
    return {"name": name, "code": PRE + code, "kinds": kinds, "forbid": list(forbid), "slow": slow,
            "max_s": max_s}


CASES = [
    # ---- S1: planted symlinks where the old parent read its results ---------------------
    case("symlink_swap_stdout_to_shadow", """
for n in ('stdout.txt', 'stderr.txt', 'status.json', 'violations.log'):
    try: os.remove(n)
    except OSError: pass
    os.symlink('/etc/shadow', n)
os.symlink('@SECRET_FILE@', 'secret_link')
print('planted')
"""),
    case("symlink_swap_relative_nested_cwd", """
os.makedirs('a/b/c', exist_ok=True)
os.chdir('a/b/c')
for n in ('stdout.txt', 'stderr.txt'):
    p = os.path.join('../../..', n)
    try: os.remove(p)
    except OSError: pass
    os.symlink('../../../../../../../../../..' + '@SECRET_FILE@', p)
"""),
    case("symlink_figure_to_secret", """
os.makedirs('figures', exist_ok=True)
os.symlink('@SECRET_FILE@', 'figures/fig_000.png')
os.symlink('/etc/shadow', 'figures/fig_001.png')
"""),
    case("symlink_after_real_plot", """
import matplotlib.pyplot as plt
plt.plot([1, 2], [3, 4])
plt.savefig('plot.png')
os.makedirs('figures', exist_ok=True)
os.symlink('/etc/shadow', 'figures/fig_000.png')
os.symlink('@SECRET_FILE@', 'figures/fig_001.png')
plt.show()
""", slow=True),
    # ---- S2: FIFOs where the old parent read, and other ways to stall the parent -----------
    case("fifo_as_stdout_file", """
for n in ('stdout.txt', 'stderr.txt', 'status.json'):
    try: os.remove(n)
    except OSError: pass
    os.mkfifo(n)
print('fifos made')
""", max_s=WALL_S + 0.5),
    case("fifo_as_figure", """
os.makedirs('figures', exist_ok=True)
os.mkfifo('figures/fig_000.png')
os.mkfifo('figures/fig_001.png')
""", max_s=WALL_S + 0.5),
    case("fifo_dup2_onto_stdout", """
os.mkfifo('f')
fd = os.open('f', os.O_RDWR)
os.dup2(fd, 1)
os.dup2(fd, 2)
os.write(1, b'into the fifo')
"""),
    case("close_every_fd_then_exit", """
os.closerange(0, 4096)
print('gone')
""", max_s=WALL_S + 0.5),
    case("forge_result_frames", """
import struct, json, zlib
fd = json.load(open('/.axpo/job.json'))['result_fd']
def frame(tag, payload): os.write(fd, struct.pack('>cI', tag, len(payload)) + payload)
frame(b'S', json.dumps({'kind': 'ok', 'message': ''}).encode())
ihdr = struct.pack('>IIBBBBB', 100000, 100000, 8, 2, 0, 0, 0)
png = b'\\x89PNG\\r\\n\\x1a\\n' + struct.pack('>I', 13) + b'IHDR' + ihdr + struct.pack('>I', zlib.crc32(b'IHDR' + ihdr))
frame(b'F', png)
frame(b'F', b'not a png at all')
os.write(fd, struct.pack('>cI', b'F', 0xFFFFFFFF) + b'x' * 100)
os._exit(0)
"""),
    case("result_pipe_flood", """
import json
fd = json.load(open('/.axpo/job.json'))['result_fd']
chunk = b'F' * (1 << 20)
for _ in range(2048):
    os.write(fd, chunk)
""", kinds={"output_limit", "timeout", "runtime_error", None}),
    case("sigstop_self", """
import signal
print('stopping', flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
""", kinds={"timeout"}),
    case("ignore_all_signals_and_sleep", """
import signal, time
for s in range(1, 65):
    try: signal.signal(s, signal.SIG_IGN)
    except (OSError, ValueError, RuntimeError): pass
time.sleep(30)
""", kinds={"timeout"}),
    # ---- S4: the trainer's process ---------------------------------------------------------
    case("pidfd_kill_parent", """
import signal
signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)
print('sent to', os.getppid())
"""),
    case("kill_parent", """
import signal
os.kill(os.getppid(), signal.SIGKILL)
"""),
    case("kill_trainer_by_host_pid", """
import signal
try:
    os.kill(@TRAINER_PID@, signal.SIGKILL); ESC('killed the trainer pid')
except ProcessLookupError: pass
try:
    os.pidfd_open(@TRAINER_PID@); ESC('pidfd on the trainer')
except ProcessLookupError: pass
"""),
    case("kill_minus_one", """
import signal
if os.getpid() > 10:
    ESC('not in a pid namespace: pid', os.getpid())
else:
    os.kill(-1, signal.SIGKILL)
    print('killed all I could')
"""),
    case("signals_to_pid1", """
import signal, time
for s in range(1, 32):
    if s in (signal.SIGSTOP,):
        continue
    try: os.kill(1, s)
    except OSError as e: print(s, e)
time.sleep(0.2)
print('still here')
"""),
    case("sigstop_init", """
import signal
os.kill(1, signal.SIGSTOP)
print('stopped init?')
"""),
    case("ptrace_attach_init", """
c = libc()
if c.ptrace(16, 1, 0, 0) == 0:   # PTRACE_ATTACH
    ESC('ptrace attached to pid 1')
if c.ptrace(0, 0, 0, 0) == 0:    # PTRACE_TRACEME
    ESC('traceme allowed')
"""),
    case("process_vm_readv_init", """
import ctypes
c = libc()
buf = ctypes.create_string_buffer(64)
class iovec(ctypes.Structure):
    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
loc = iovec(ctypes.addressof(buf), 64); rem = iovec(0x400000, 64)
if c.syscall(310, 1, ctypes.byref(loc), 1, ctypes.byref(rem), 1, 0) > 0:
    ESC('read the memory of pid 1')
try:
    open('/proc/1/mem', 'rb').read(1); ESC('opened /proc/1/mem')
except OSError: pass
"""),
    # ---- S5 / M1: secrets of the trainer ---------------------------------------------------
    case("proc_ppid_environ", "print(open(f'/proc/{os.getppid()}/environ').read())"),
    case("proc_ppid_cmdline", "print(open(f'/proc/{os.getppid()}/cmdline').read())"),
    case("proc_every_environ_and_cmdline", """
for p in os.listdir('/proc'):
    if p.isdigit() or p == 'self':
        for f in ('environ', 'cmdline', 'status'):
            try: print(p, f, open(f'/proc/{p}/{f}', 'rb').read()[:4000])
            except OSError as e: print(p, f, e)
print(len([p for p in os.listdir('/proc') if p.isdigit()]), 'pids')
"""),
    case("proc_trainer_by_host_pid", """
for f in ('environ', 'cmdline'):
    try: print(open(f'/proc/@TRAINER_PID@/{f}', 'rb').read())
    except OSError as e: print(e)
"""),
    case("environment_dump", "print(dict(os.environ))\nprint(os.environ.get('HF_TOKEN'), os.environ.get('WANDB_API_KEY'))"),
    # ---- H1: the old in-process audit hook -------------------------------------------------
    case("audit_hook_disable_then_write", """
import __main__
__main__._in_hook = True
sys.modules['__main__']._in_hook = True
try:
    W('@RUN_DIR@/checkpoints/latest'); ESC('rewrote the checkpoint')
except OSError as e: print(e)
"""),
    case("audit_hook_disable_then_connect", """
import __main__, socket
__main__._in_hook = True
s = socket.socket()
s.settimeout(1)
try:
    s.connect(('127.0.0.1', @TCP_PORT@)); ESC('connected')
except OSError as e: print(e)
"""),
    case("audit_hook_neuter_by_gc", """
import gc
for o in gc.get_objects():
    if callable(o) and getattr(o, '__name__', '') in ('_hook', '_violation', '_inside'):
        try: o.__code__ = (lambda *a: None).__code__
        except Exception: pass
try:
    os.system('echo ESCAPED via system'); os.fork()
except OSError as e: print(e)
"""),
    # ---- H2: dir_fd writes and host sockets ----------------------------------------------
    case("dir_fd_write_from_root", """
fd = os.open('/', os.O_RDONLY | os.O_DIRECTORY)
for rel in ('@RUN_DIR_REL@/checkpoints/latest', 'etc/axpo_pwned', 'usr/axpo_pwned'):
    try:
        w = os.open(rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666, dir_fd=fd)
        os.write(w, b'pwned'); ESC('wrote', rel)
    except OSError as e: print(rel, e)
"""),
    case("dir_fd_mkdir_in_venv", """
site = [p for p in sys.path if p.endswith('site-packages')]
for d in site + [sys.prefix]:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir('axpo_pwned', dir_fd=fd); ESC('mkdir in', d)
    except OSError as e: print(d, e)
    try:
        os.symlink('/etc/shadow', 'axpo_pwned_link', dir_fd=fd); ESC('symlink in', d)
    except OSError as e: print(d, e)
"""),
    case("unix_socket_host_path", """
import socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect('@UNIX_PATH@'); s.send(b'hi'); ESC('unix connect')
except OSError as e: print(e)
"""),
    case("unix_socket_abstract", """
import socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect('\\0@ABSTRACT@'); s.send(b'hi'); ESC('abstract connect')
except OSError as e: print(e)
"""),
    case("unix_socket_scan_well_known", """
import socket, glob
found = 0
for pat in ('/run/*', '/run/*/*', '/var/run/*', '/tmp/*', '/tmp/*/*', '/dev/log', '/run/docker.sock'):
    for p in glob.glob(pat):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(p); ESC('connected to', p)
        except OSError: pass
        found += 1
print(found, 'paths tried')
"""),
    # ---- S6: network ------------------------------------------------------------------------
    case("tcp_localhost", """
import socket
s = socket.socket(); s.settimeout(1)
try:
    s.connect(('127.0.0.1', @TCP_PORT@)); s.send(b'hi'); ESC('tcp connected')
except OSError as e: print(e)
"""),
    case("udp_localhost", """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    try: s.sendto(b'hi', ('127.0.0.1', @UDP_PORT@))
    except OSError as e: print(e)
"""),
    case("tcp6_localhost", """
import socket
try:
    s = socket.socket(socket.AF_INET6); s.settimeout(1)
    s.connect(('::1', @TCP6_PORT@)); ESC('tcp6 connected')
except OSError as e: print(e)
"""),
    case("tcp_port_scan_localhost", """
import socket
open_ports = []
for port in [22, 80, 443, 3000, 5000, 6379, 8000, 8080, 8888, @TCP_PORT@]:
    s = socket.socket(); s.settimeout(0.2)
    if s.connect_ex(('127.0.0.1', port)) == 0: open_ports.append(port)
if open_ports: ESC('open', open_ports)
"""),
    case("external_network", """
import socket
for addr in (('1.1.1.1', 443), ('8.8.8.8', 53)):
    s = socket.socket(); s.settimeout(0.5)
    try:
        s.connect(addr); ESC('internet', addr)
    except OSError as e: print(addr, e)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try: u.sendto(b'x', ('8.8.8.8', 53)); print('udp queued')
except OSError as e: print(e)
"""),
    case("dns_lookup", """
import socket
try:
    print(socket.getaddrinfo('pypi.org', 443)); ESC('dns works')
except OSError as e: print(e)
"""),
    case("raw_and_packet_sockets", """
import socket
for fam, typ, proto in ((socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                        (socket.AF_PACKET, socket.SOCK_RAW, 0x0300)):
    try:
        socket.socket(fam, typ, proto); ESC('raw socket', fam)
    except OSError as e: print(e)
"""),
    case("network_interfaces", """
import socket
names = [n for _, n in socket.if_nameindex()]
print(names)
if set(names) - {'lo'}: ESC('interfaces', names)
"""),
    # ---- S6 / M2: files of the host -----------------------------------------------------------
    case("read_ssh_keys", """
import glob
for p in ['@HOME@/.ssh/id_rsa', os.path.expanduser('~/.ssh/id_rsa'), *glob.glob('/root/.ssh/*'),
          *glob.glob('/home/*/.ssh/*')]:
    try: print(p, open(p).read())
    except OSError as e: print(p, e)
"""),
    case("read_etc_shadow", """
for p in ('/etc/shadow', '/etc/gshadow', '/etc/sudoers'):
    try: print(open(p).read())
    except OSError as e: print(e)
"""),
    case("read_secret_file", """
try: print(open('@SECRET_FILE@').read())
except OSError as e: print(e)
try: print(os.listdir('@WORKSPACE@'))
except OSError as e: print(e)
"""),
    case("walk_whole_filesystem", """
hits = []
for root, dirs, files in os.walk('/'):
    if root.startswith(('/proc', '/usr', '/sys', sys.prefix, sys.base_prefix)):
        dirs[:] = []
        continue
    for f in files:
        p = os.path.join(root, f)
        if p.startswith('@WORKSPACE@'): hits.append(p)
        try:
            if 'AXPO' in open(p, errors='ignore').read(1 << 16) and 'job.json' not in p and 'child.py' not in p:
                hits.append(p)
        except OSError: pass
if hits: ESC(hits[:5])
"""),
    case("mountinfo_shows_host_paths", """
info = open('/proc/self/mountinfo').read()
print(info[:1500])
if '@WORKSPACE@' in info: ESC('workspace mounted')
"""),
    case("kernel_memory_and_log", """
for p in ('/proc/kcore', '/proc/kmsg', '/dev/kmsg', '/dev/mem', '/dev/port'):
    try:
        data = open(p, 'rb').read(16)
        if data: ESC('read', p)
    except OSError as e: print(p, e)
"""),
    # ---- S6: writes to the host -------------------------------------------------------------
    case("checkpoint_rewrite", """
ck = '@RUN_DIR@/checkpoints/latest'
for attempt in (lambda: W(ck),
                lambda: os.replace('x', ck),
                lambda: os.symlink('/etc/shadow', ck + '.new'),
                lambda: os.truncate(ck, 0)):
    try:
        W('x'); attempt(); ESC('checkpoint attempt worked')
    except OSError as e: print(e)
"""),
    case("write_venv_site_packages", """
site = [p for p in sys.path if p.endswith('site-packages')]
for d in site:
    for name in ('sitecustomize.py', 'axpo_evil.pth'):
        try:
            W(os.path.join(d, name), 'import os'); ESC('wrote', d, name)
        except OSError as e: print(e)
"""),
    case("write_base_prefix_stdlib", """
import os as _os
for p in (_os.__file__, os.path.join(sys.base_prefix, 'lib', 'axpo_pwned.py'), sys.executable):
    try:
        W(p, '# pwned', 'a'); ESC('appended to', p)
    except OSError as e: print(e)
"""),
    case("write_system_folders", """
for p in ('/usr/bin/axpo_pwned', '/etc/passwd', '/bin/sh', '/.axpo/child.py', '/.axpo/job.json', '/axpo_pwned', '/root/axpo_pwned'):
    try:
        W(p, 'pwned', 'a'); ESC('wrote', p)
    except OSError as e: print(p, e)
"""),
    case("write_dev", """
open('/dev/null', 'w').write('fine')
for p in ('/dev/axpo_pwned', '/dev/shm/axpo_pwned', '/dev/sda', '/dev/vda', '/dev/nvme0n1'):
    try:
        W(p, 'x'); ESC('wrote', p)
    except OSError as e: print(p, e)
try:
    os.mknod('blk', 0o600 | 0o060000, os.makedev(8, 0)); ESC('made a block device')
except OSError as e: print(e)
"""),
    case("write_sys", """
for p in ('/sys/kernel/mm/transparent_hugepage/enabled', '/sys/fs/cgroup/cgroup.procs', '/sys/power/state'):
    try:
        W(p, 'x'); ESC('wrote', p)
    except OSError as e: print(p, e)
print(os.path.exists('/sys'))
"""),
    case("write_proc_sys_same_value", """
for p in ('/proc/sys/kernel/core_pattern', '/proc/sys/vm/drop_caches', '/proc/sys/kernel/hostname'):
    try:
        old = open(p).read() if p != '/proc/sys/vm/drop_caches' else '0'
    except OSError as e:
        print(p, e); continue
    try:
        fd = os.open(p, os.O_WRONLY)
    except OSError as e:
        print(p, e); continue
    # Opened for writing: the escape happened. Nothing is written (the same value back at most).
    os.close(fd); ESC('can write', p)
try:
    W('/proc/sysrq-trigger', 'h'); ESC('sysrq')
except OSError as e: print(e)
"""),
    case("oom_score_adj_and_priority", """
try:
    W('/proc/self/oom_score_adj', '-1000'); ESC('oom_score_adj lowered')
except OSError as e: print(e)
try:
    os.setpriority(os.PRIO_PROCESS, 0, -20); ESC('priority raised')
except OSError as e: print(e)
"""),
    # ---- processes ---------------------------------------------------------------------------
    case("fork_bomb", """
try:
    pid = os.fork()
except OSError as e:
    print('first fork failed:', e)
    while True:
        os.fork()
else:
    if pid == 0: os._exit(0)
    ESC('fork worked')
""", kinds={"sandbox_violation"}),
    case("thread_bomb", """
import threading
try:
    for _ in range(1000):
        threading.Thread(target=lambda: __import__('time').sleep(10)).start()
    ESC('1000 threads')
except RuntimeError as e: print(e)
"""),
    case("subprocess_shell", "import subprocess\nprint(subprocess.run(['sh', '-c', 'cat /etc/shadow; id'], capture_output=True))"),
    case("os_system_and_popen", "print(os.system('id'))\nprint(os.popen('id').read())"),
    case("execv_shell_attack", """
os.execv('/bin/sh', ['sh', '-c', 'cat @SECRET_FILE@ @HOME@/.ssh/id_rsa /etc/shadow; echo "$HF_TOKEN"; '
         'ls /proc; [ $$ -lt 10 ] && kill -9 -1; echo done'])
"""),
    case("execv_setuid_binaries", """
import stat
cands = [p for p in ('/usr/bin/su', '/usr/bin/sudo', '/usr/bin/passwd', '/usr/bin/newgrp', '/usr/bin/mount')
         if os.path.exists(p) and os.stat(p).st_mode & stat.S_ISUID]
print('setuid:', cands)
info = open('/proc/self/mountinfo').read().splitlines()
usr = [l for l in info if ' /usr ' in l]
print(usr)
if usr and 'nosuid' not in usr[0]: ESC('/usr without nosuid')
if cands:
    os.execv(cands[0], [cands[0], '-c', 'id'] if cands[0].endswith('su') else [cands[0], '--help'])
""", forbid=["uid=0("]),
    case("setuid_to_root", """
for f, a in ((os.setuid, 0), (os.setgid, 0), (os.setgroups, [0]), (os.seteuid, 0)):
    try:
        f(a); ESC(f.__name__, 'worked')
    except OSError as e: print(e)
print(os.getuid(), os.geteuid(), open('/proc/self/status').read().split('CapInh')[1][:150])
"""),
    case("raise_rlimits", """
import resource
for r in (resource.RLIMIT_NPROC, resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE):
    try:
        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)); ESC('raised', r)
    except (OSError, ValueError) as e: print(e)
"""),
    # ---- kernel interfaces the seccomp filter and the namespaces close --------------------
    case("mount_attempts", """
import ctypes
c = libc()
os.makedirs('m', exist_ok=True)
for args in ((b'tmpfs', b'm', b'tmpfs', 0, None), (None, b'/', None, 32 | 4096, None),
             (b'/usr', b'm', None, 4096, None), (b'proc', b'm', b'proc', 0, None)):
    if c.mount(*args) == 0: ESC('mount', args)
if c.umount2(b'/usr', 2) == 0: ESC('umount /usr')
if c.umount2(b'/proc', 2) == 0: ESC('umount /proc')
"""),
    case("unshare_new_namespaces", """
c = libc()
for flag in (0x10000000, 0x00020000, 0x40000000, 0x20000000):
    if c.unshare(flag) == 0: ESC('unshare', hex(flag))
"""),
    case("clone_with_namespace_flags", """
c = libc()
r = c.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)
if r == 0: os._exit(0)
if r > 0: ESC('clone(CLONE_NEWUSER) made', r)
print('clone ->', r, __import__('ctypes').get_errno())
"""),
    case("setns_into_init_namespaces", """
c = libc()
for ns in ('mnt', 'pid', 'net', 'user'):
    try: fd = os.open(f'/proc/1/ns/{ns}', os.O_RDONLY)
    except OSError as e: print(ns, e); continue
    if c.setns(fd, 0) == 0: ESC('setns', ns)
"""),
    case("chroot_and_pivot_root", """
c = libc()
try:
    os.chroot('.'); ESC('chroot')
except OSError as e: print(e)
if c.syscall(155, b'.', b'.') == 0: ESC('pivot_root')
"""),
    case("keyring_syscalls", """
c = libc()
if c.syscall(250, 0, -4, 0) >= 0: ESC('keyctl')
if c.syscall(248, b'user', b'axpo', b'x', 1, -4) >= 0: ESC('add_key')
"""),
    case("bpf_and_perf_event", """
import ctypes
c = libc()
attr = ctypes.create_string_buffer(128)
if c.syscall(321, 0, attr, 48) >= 0: ESC('bpf map')
if c.syscall(298, attr, 0, -1, -1, 0) >= 0: ESC('perf_event_open')
"""),
    case("userfaultfd_and_io_uring", """
import ctypes
c = libc()
if c.syscall(323, 0) >= 0: ESC('userfaultfd')
params = ctypes.create_string_buffer(120)
if c.syscall(425, 8, params) >= 0: ESC('io_uring_setup')
"""),
    case("memfd_memory_bomb", """
try:
    fds = [os.memfd_create(f'm{i}') for i in range(200)]
    ESC('memfd_create works')
except OSError as e: print(e)
"""),
    case("tiocsti_and_tty", """
import fcntl, termios
for fd in (0, 1, 2):
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b'x'); ESC('TIOCSTI on', fd)
    except OSError as e: print(e)
try:
    W('/dev/tty', 'x'); ESC('controlling tty')
except OSError as e: print(e)
"""),
    case("x32_abi_syscall", """
c = libc()
print('x32 getpid ->', c.syscall(0x40000000 | 39))
ESC('x32 syscall returned')
""", kinds={"timeout", "runtime_error"}),
    case("sethostname_and_uts", """
import socket
try:
    socket.sethostname('pwned'); ESC('sethostname')
except OSError as e: print(e)
print(socket.gethostname())
"""),
    case("sysv_shared_memory", """
c = libc()
shmid = c.shmget(0, 1 << 30, 0o1000 | 0o600)
print('shmget', shmid)
if shmid >= 0:
    addr = c.shmat(shmid, None, 0)
    print('shmat', addr)
"""),
    # ---- resources ---------------------------------------------------------------------------
    case("infinite_loop", "while True:\n    pass", kinds={"timeout"}),
    case("infinite_loop_ignoring_sigxcpu", """
import signal
signal.signal(signal.SIGXCPU, signal.SIG_IGN)
while True:
    pass
""", kinds={"timeout"}),
    case("sleep_forever", "import time\ntime.sleep(3600)", kinds={"timeout"}),
    case("memory_bomb", """
chunks = []
try:
    for _ in range(24):   # at most 1.5 GB: bounded even if the limit were broken
        chunks.append(bytearray(64 << 20))
except MemoryError:
    print('MemoryError after', len(chunks) * 64, 'MB')
else:
    ESC('allocated', len(chunks) * 64, 'MB')
""", kinds={"memory", "timeout", None}),
    case("mmap_address_space_bomb", """
import mmap
try:
    m = mmap.mmap(-1, 8 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, 'MAP_NORESERVE', 0))
    ESC('mapped 8 GB')
except OSError as e: print(e)
"""),
    case("recursion_crash", """
sys.setrecursionlimit(10 ** 7)
def f(n): return f(n + 1) + 1
f(0)
""", kinds={"runtime_error", "memory", "timeout"}),
    case("huge_stdout", "while True:\n    print('x' * 10000)", kinds={"output_limit", "timeout"}),
    case("huge_stderr", "while True:\n    sys.stderr.write('y' * 10000)", kinds={"output_limit", "timeout"}),
    case("huge_single_write", "os.write(1, b'z' * (200 << 20))", kinds={"output_limit", "timeout", "memory"}),
    case("binary_garbage_output", "os.write(1, bytes(range(256)) * 100)\nos.write(2, b'\\xff\\xfe\\x00' * 1000)"),
    case("disk_fill", """
total, n = 0, 0
try:
    while total < (512 << 20):   # bounded: at most 512 MB even if no cap held
        with open(f'fill{n}', 'wb') as f:
            f.write(b'\\0' * (16 << 20))
        total += 16 << 20; n += 1
        if total > (96 << 20):   # reported as it happens: a timeout cannot hide it
            ESC('wrote', total >> 20, 'MB'); break
except OSError as e:
    print(e)
print('wrote', total >> 20, 'MB')
""", kinds={"output_limit", "runtime_error", "timeout", None}),
    case("many_files", """
n = 0
try:
    while n < 200000:
        open(f'f{n}', 'w').close(); n += 1
        if n > 2000:             # the cap is 2000 files + folders, a kernel limit (tmpfs nr_inodes)
            ESC('created', n, 'files'); break
except OSError as e: print(e)
print('files', n)
""", kinds={"output_limit", "timeout", "runtime_error"}),
    case("no_privileges_left", """
st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
caps = {k: int(st[k].strip(), 16) for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb')}
if any(caps.values()) or st['NoNewPrivs'].strip() != '1' or st['Seccomp'].strip() != '2':
    ESC('privileges left:', caps, 'NoNewPrivs', st['NoNewPrivs'].strip(), 'Seccomp', st['Seccomp'].strip())
print('none')
""", kinds={None}),
    case("inode_cap_is_the_kernels", """
st = os.statvfs('.')          # the working tmpfs itself says how many inodes it may ever hold
if st.f_files != 2001:        # max_files 2000 + the folder itself
    ESC('the working folder has no kernel inode cap:', st.f_files, 'inodes')
print('inodes', st.f_files)
""", kinds={None}),
    case("deep_directories", """
try:
    for i in range(3000):
        os.mkdir('d'); os.chdir('d')
except OSError as e: print(e)
print('depth reached')
""", kinds={"output_limit", "timeout", "runtime_error", None}),
    case("sparse_huge_file", """
try:
    with open('big', 'wb') as f:
        f.truncate(1 << 40)
    ESC('1 TB file')
except OSError as e: print(e)
"""),
    case("fd_exhaustion", """
fds = []
try:
    while len(fds) < 100000:
        fds.append(os.open('/dev/null', os.O_RDONLY))
except OSError as e: print(e)
print(len(fds), 'fds')
if len(fds) > 1000: ESC(len(fds), 'fds')
"""),
    case("tmp_is_private", """
open('/tmp/axpo_probe', 'w').write('x')
print(os.listdir('/tmp'))
if any(n.startswith(('pytest-', 'axpo-sandbox-', 'systemd')) for n in os.listdir('/tmp')): ESC('host /tmp visible')
"""),
]
CASE_BY_NAME = {c["name"]: c for c in CASES}
CONCURRENT = ["concurrent_hang_vs_benign", "concurrent_fill_vs_benign", "concurrent_attack_neighbour"]


# =================================================================================================
# Runner (this file as a script): plays the trainer, runs the cases, writes one JSON line each.
# =================================================================================================

def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _snapshot(paths: list[str], shallow: list[str]) -> dict:
    """Mode, size, mtime and (small files) content hash of everything under `paths`, and of the
    top level of each folder in `shallow` (site-packages: where a .pth or sitecustomize acts)."""
    snap = {}

    def add(p):
        try:
            st = os.lstat(p)
        except OSError:
            return
        digest = ""
        if not os.path.islink(p) and os.path.isfile(p) and st.st_size < 1 << 16:
            try:
                digest = hashlib.sha1(open(p, "rb").read()).hexdigest()
            except OSError:
                digest = "unreadable"
        snap[p] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)

    for top in paths:
        add(top)
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                add(os.path.join(root, name))
    for top in shallow:
        add(top)
        try:
            names = os.listdir(top)
        except OSError:
            continue
        snap[top + "/"] = tuple(sorted(names))
    return snap


class _Listeners:
    def __init__(self, workspace: str):
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(16)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.tcp6 = None
        try:
            self.tcp6 = socket.socket(socket.AF_INET6)
            self.tcp6.bind(("::1", 0))
            self.tcp6.listen(16)
        except OSError:
            self.tcp6 = None
        self.unix_path = os.path.join(workspace, "pub", "canary.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)  # connectable by anyone: only isolation keeps the sandbox out
        self.unix.listen(16)
        self.abstract = f"axpo-canary-{os.getpid()}"
        self.abs = socket.socket(socket.AF_UNIX)
        self.abs.bind("\0" + self.abstract)
        self.abs.listen(16)
        for s in self.all():
            s.setblocking(False)

    def all(self):
        return [s for s in (self.tcp, self.udp, self.tcp6, self.unix, self.abs) if s is not None]

    def hits(self) -> list[str]:
        out = []
        for name, s in (("tcp", self.tcp), ("tcp6", self.tcp6), ("unix", self.unix), ("abstract", self.abs)):
            if s is None:
                continue
            while True:
                try:
                    conn, _ = s.accept()
                    conn.close()
                    out.append(name)
                except (BlockingIOError, OSError):
                    break
        while True:
            try:
                self.udp.recvfrom(65536)
                out.append("udp")
            except (BlockingIOError, OSError):
                break
        return out


def _runner(cfg_path: str) -> None:
    from axpo.tools import PythonSandboxTool, SandboxConfig

    cfg = json.load(open(cfg_path))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of our calls come back to us
    ws = cfg["workspace"]
    lis = _Listeners(ws)
    me = os.getpid()
    site_dirs = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    canaries = ([cfg["run_dir"], cfg["home"]], site_dirs)
    secrets = [s for s in cfg["secrets"] if s]
    subs = {
        "@TCP_PORT@": str(lis.tcp.getsockname()[1]), "@UDP_PORT@": str(lis.udp.getsockname()[1]),
        "@TCP6_PORT@": str(lis.tcp6.getsockname()[1] if lis.tcp6 else lis.tcp.getsockname()[1]),
        "@UNIX_PATH@": lis.unix_path, "@ABSTRACT@": lis.abstract, "@TRAINER_PID@": str(me),
        "@RUN_DIR@": cfg["run_dir"], "@RUN_DIR_REL@": cfg["run_dir"].lstrip("/"), "@HOME@": cfg["home"],
        "@SECRET_FILE@": cfg["secret_file"], "@WORKSPACE@": ws,
    }
    tool = PythonSandboxTool(SandboxConfig(wall_timeout_s=WALL_S, cpu_time_s=1, memory_mb=512))
    slow_tool = PythonSandboxTool(SandboxConfig(wall_timeout_s=SLOW_WALL_S, cpu_time_s=8, memory_mb=768))
    if hasattr(tool, "check"):
        tool.check()
    out = open(cfg["out"], "a", buffering=1)
    out.write(json.dumps({"case": "__runner__", "uid": os.getuid(), "euid": os.geteuid()}) + "\n")

    def call(t, code, hard_s):
        box = {}

        def go():
            try:
                box["r"] = t.run(code)
            except BaseException as e:  # the tool must never raise for anything the code did
                box["exc"] = f"{type(e).__name__}: {e}"
        th = threading.Thread(target=go, daemon=True)
        start = time.monotonic()
        th.start()
        th.join(hard_s)
        return box, time.monotonic() - start, th.is_alive()

    def subst(code):
        for k, v in subs.items():
            code = code.replace(k, v)
        return code

    def host_checks(problems, before):
        hits = lis.hits()
        if hits:
            problems.append(f"listener reached: {hits}")
        after = _snapshot(*canaries)
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))[:4]
            problems.append(f"canary changed: {changed}")
        box, took, hung = call(tool, "print(6 * 7)", WALL_S + 8)
        r = box.get("r")
        if hung or r is None or r.error is not None or r.text.strip() != "42":
            problems.append(f"benign call after the case failed: {box.get('exc') or (r and r.text[:200])}")
        end = time.monotonic() + 10
        while True:
            while True:  # reap what came back to us
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
            left = _descendants(me)
            if not left or time.monotonic() > end:
                break
            time.sleep(0.1)
        if left:
            names = []
            for p in left[:5]:
                try:
                    names.append(open(f"/proc/{p}/cmdline", "rb").read()[:80].decode(errors="replace"))
                except OSError:
                    names.append(str(p))
            problems.append(f"processes left after 10 s: {names}")

    def check_text(problems, text, forbid):
        if "ESCAPED" in text:
            problems.append("attack reported success: " + text[text.index("ESCAPED"):][:200])
        for s in secrets + list(forbid):
            if s in text:
                problems.append(f"secret or forbidden text in the output: {s[:12]}...")

    only = set(cfg.get("only") or [])
    for c in CASES:
        if only and c["name"] not in only:
            continue
        problems: list[str] = []
        before = _snapshot(*canaries)
        t = slow_tool if c["slow"] else tool
        box, took, hung = call(t, subst(c["code"]), t.cfg.wall_timeout_s + 6)
        r = box.get("r")
        if hung:
            problems.append(f"the tool call hung (> {t.cfg.wall_timeout_s + 6:g} s)")
        elif r is None:
            problems.append(f"the tool raised {box.get('exc')}")
        else:
            max_s = c["max_s"] or t.cfg.wall_timeout_s + 3
            if took > max_s:
                problems.append(f"the call took {took:.1f} s (limit {max_s:g} s)")
            if c["kinds"] is not None and r.error not in c["kinds"]:
                problems.append(f"error kind {r.error!r}, expected one of {sorted(map(str, c['kinds']))}")
            check_text(problems, r.text, c["forbid"])
        host_checks(problems, before)
        out.write(json.dumps({"case": c["name"], "problems": problems, "error": r.error if r else None,
                              "text": (r.text if r else "")[:600], "seconds": round(took, 2)}) + "\n")
        if hung:
            break  # a hung call keeps its thread: stop here, the remaining cases report as missing

    # ---- concurrent calls: one attacks or hogs, the other must finish correctly and fast ---------
    pairs = {
        "concurrent_hang_vs_benign": ("import time\nprint('A-alive', flush=True)\ntime.sleep(60)", {"timeout"}),
        "concurrent_fill_vs_benign": ("n = 0\ntry:\n    while True:\n        open(f'f{n}', 'wb').write(b'0' * (1 << 20)); n += 1\n"
                                      "except OSError:\n    pass\nwhile True:\n    open(f'g{n}', 'w').close(); n += 1",
                                      {"timeout", "output_limit", "runtime_error"}),
        "concurrent_attack_neighbour": ("import time\nopen('A_MARKER_FILE', 'w').write('a')\nprint('A-alive', flush=True)\n"
                                        "time.sleep(60)", {"timeout"}),
    }
    attack = PRE + """
import signal, time
time.sleep(0.3)
pids = [p for p in os.listdir('/proc') if p.isdigit()]
print('pids', sorted(pids, key=int))
if os.getpid() > 10 or len(pids) > 2:
    ESC('sees other processes', pids[:10])
else:
    for pid in range(3, 4096):
        try: os.kill(pid, signal.SIGKILL); ESC('killed', pid)
        except OSError: pass
for root, dirs, files in os.walk('/'):
    if root.startswith(('/proc', '/usr', '/sys', sys.prefix, sys.base_prefix)): dirs[:] = []; continue
    if 'A_MARKER_FILE' in files: ESC('found the neighbour', root)
print(sum(range(10 ** 6)))
"""
    benign = "import time\ntime.sleep(0.3)\nprint(sum(range(10 ** 6)))"
    for name, (a_code, a_kinds) in pairs.items():
        if only and name not in only:
            continue
        problems = []
        before = _snapshot(*canaries)
        res = {}

        def run_a():
            res["a"] = call(tool, PRE + a_code, WALL_S + 8)
        ta = threading.Thread(target=run_a)
        ta.start()
        time.sleep(0.05)
        box, took, hung = call(tool, attack if name == "concurrent_attack_neighbour" else benign, WALL_S + 8)
        ta.join(WALL_S + 10)
        r = box.get("r")
        if hung or r is None or r.error is not None or r.text.strip().splitlines()[-1:] != ["499999500000"]:
            problems.append(f"the second call did not finish correctly: {box.get('exc') or (r and r.text[:300])}")
        elif took > WALL_S - 0.1 and name != "concurrent_attack_neighbour":
            problems.append(f"the second call took {took:.2f} s: it waited for the first")
        if r is not None:
            check_text(problems, r.text, ())
        a_box, a_took, a_hung = res.get("a", ({}, 0, True))
        ra = a_box.get("r")
        if a_hung or ra is None:
            problems.append("the first call hung or raised")
        else:
            if ra.error not in a_kinds:
                problems.append(f"first call: error {ra.error!r}, expected {sorted(a_kinds)}")
            if "A-alive" in a_code and ("A-alive" not in ra.text or a_took < WALL_S - 0.2):
                problems.append(f"first call was disturbed: {ra.text[:200]} after {a_took:.2f} s")
            check_text(problems, ra.text, ())
        host_checks(problems, before)
        out.write(json.dumps({"case": name, "problems": problems, "error": r.error if r else None,
                              "text": (r.text if r else "")[:600], "seconds": round(took, 2)}) + "\n")
    out.write(json.dumps({"case": "__done__"}) + "\n")
    out.close()
    os._exit(0)


# =================================================================================================
# pytest side
# =================================================================================================

def _traversable_by_others(path: str) -> str | None:
    """The topmost ancestor of `path` that others cannot search, or None."""
    p = Path(path).resolve()
    for parent in reversed([p, *p.parents]):
        try:
            if not parent.stat().st_mode & 0o001:
                return str(parent)
        except OSError:
            return str(parent)
    return None


def _setup_workspace(owner: int) -> dict:
    ws = tempfile.mkdtemp(prefix="axpo-hostile-", dir="/tmp")
    os.chmod(ws, 0o755)
    run_dir = os.path.join(ws, "run")
    home = os.path.join(ws, "home")
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    os.makedirs(os.path.join(home, ".ssh"))
    os.makedirs(os.path.join(ws, "pub"))
    ssh_secret = "ssh-rsa-FAKEKEYAXPO-" + os.urandom(8).hex()
    ckpt = "ckpt-step-100-" + os.urandom(4).hex()
    Path(home, ".ssh", "id_rsa").write_text(ssh_secret + "\n")
    Path(run_dir, "checkpoints", "latest").write_text(ckpt + "\n")
    secret = "ROOTONLY-AXPO-" + os.urandom(8).hex()
    secret_file = os.path.join(ws, "secret.txt")
    Path(secret_file).write_text(secret + "\n")
    # Permissive modes: only the sandbox's isolation, not file permissions, keeps it out.
    for root, dirs, files in os.walk(ws):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666)
    os.chmod(secret_file, 0o600)  # owned by root (or by the runner when not root)
    if owner != os.geteuid():
        for root, dirs, files in os.walk(ws):
            for n in dirs + files:
                if os.path.join(root, n) != secret_file:
                    os.chown(os.path.join(root, n), owner, owner)
        os.chown(ws, owner, owner)
    shadow_line = ""
    try:
        shadow_line = open("/etc/shadow").read().splitlines()[0]
    except (OSError, IndexError):
        pass
    out = os.path.join(ws, "results.jsonl")
    Path(out).touch()
    if owner != os.geteuid():
        os.chown(out, owner, owner)
    cfg = {"workspace": ws, "run_dir": run_dir, "home": home, "secret_file": secret_file, "out": out,
           "secrets": [FAKE_HF, FAKE_WANDB, ssh_secret, secret, shadow_line, ckpt], "only": []}
    cfg_path = os.path.join(ws, "config.json")
    Path(cfg_path).write_text(json.dumps(cfg))
    os.chmod(cfg_path, 0o644)
    return cfg | {"config": cfg_path, "log": tempfile.TemporaryFile()}


def _runner_env(home: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
            "HF_TOKEN": FAKE_HF, "WANDB_API_KEY": FAKE_WANDB, "PYTHONDONTWRITEBYTECODE": "1"}


def _start(variant: str):
    """Start one runner; return (Popen, cfg) or a skip reason."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    argv = [sys.executable, "-B", os.path.abspath(__file__), "--run", None, f"--hf-token={FAKE_HF}",
            f"--wandb-key={FAKE_WANDB}"]
    is_root = os.geteuid() == 0
    if variant == "root":
        if not is_root:
            return "the root variant needs the tests to run as root"
        cfg = _setup_workspace(0)
        argv[4] = cfg["config"]
        proc = subprocess.Popen(argv, env=_runner_env(cfg["home"]), cwd=cfg["workspace"],
                                stdout=cfg["log"], stderr=subprocess.STDOUT)
        return proc, cfg
    if not is_root:  # we already are an unprivileged trainer
        cfg = _setup_workspace(os.geteuid())
        argv[4] = cfg["config"]
        return subprocess.Popen(argv, env=_runner_env(cfg["home"]), cwd=cfg["workspace"],
                                stdout=cfg["log"], stderr=subprocess.STDOUT), cfg
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"the unprivileged variant needs {tool} (util-linux)"
    try:
        pwd.getpwuid(UNPRIV_UID)
        return f"uid {UNPRIV_UID} exists on this machine; the unprivileged variant needs it unused"
    except KeyError:
        pass
    cfg = _setup_workspace(UNPRIV_UID)
    argv[4] = cfg["config"]
    # A private mount namespace in which what the runner needs is reachable by an unprivileged
    # user: folders under a private parent (/root, mode 0700) are bound onto a 0755 tmpfs there.
    repo = str(Path(__file__).resolve().parents[1])
    need = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, repo)})
    blockers = sorted({b for p in need if (b := _traversable_by_others(p))})
    blockers = [b for b in blockers if not any(b != o and b.startswith(o + "/") for o in blockers)]
    stage = tempfile.mkdtemp(prefix="axpo-hostile-stage-", dir="/tmp")
    lines = ["set -e"]
    staged = [p for p in need if any(p == b or p.startswith(b + "/") for b in blockers)]
    for i, p in enumerate(staged):
        lines += [f"mkdir -p '{stage}/{i}'", f"mount --rbind '{p}' '{stage}/{i}'"]
    for b in blockers:
        lines.append(f"mount -t tmpfs -o mode=0755 axpo-test '{b}'")
    for i, p in enumerate(staged):
        lines += [f"mkdir -p '{p}'", f"mount --rbind '{stage}/{i}' '{p}'"]
    lines.append(f'exec setpriv --reuid={UNPRIV_UID} --regid={UNPRIV_UID} --clear-groups -- "$@"')
    cmd = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", "\n".join(lines), "sh", *argv]
    proc = subprocess.Popen(cmd, env=_runner_env(cfg["home"]), cwd=cfg["workspace"],
                            stdout=cfg["log"], stderr=subprocess.STDOUT)
    cfg["stage"] = stage
    return proc, cfg


_RESULTS: dict = {}
_LOCK = threading.Lock()


def _results() -> dict:
    with _LOCK:
        if _RESULTS:
            return _RESULTS
        started = {v: _start(v) for v in ("root", "unprivileged")}
        for variant, st in started.items():
            if isinstance(st, str):
                _RESULTS[variant] = {"skip": st}
                continue
            proc, cfg = st
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            cfg["log"].seek(0)
            log = cfg["log"].read()
            rows = {}
            for line in Path(cfg["out"]).read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                rows[row["case"]] = row
            _RESULTS[variant] = {"rows": rows, "rc": proc.returncode, "log": log.decode(errors="replace")[-3000:],
                                 "done": "__done__" in rows}
            shutil.rmtree(cfg["workspace"], ignore_errors=True)
            if cfg.get("stage"):
                shutil.rmtree(cfg["stage"], ignore_errors=True)
        return _RESULTS


ALL_NAMES = [c["name"] for c in CASES] + CONCURRENT


def test_suite_is_large_and_distinct():
    assert len(ALL_NAMES) == len(set(ALL_NAMES)) >= 60
    assert len({c["code"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("variant", ["root", "unprivileged"])
def test_hostile_case_is_contained(variant, name):
    res = _results()[variant]
    if "skip" in res:
        pytest.skip(res["skip"])
    row = res["rows"].get(name)
    assert row is not None, (f"no result for {name}: the runner (the trainer) stopped reporting "
                             f"(exit status {res['rc']}); log:\n{res['log']}")
    assert row["problems"] == [], f"{name} ({variant}): {row['problems']}\noutput: {row['text']}"


def test_runners_finished_and_counts():
    res = _results()
    lines = []
    for variant, r in res.items():
        if "skip" in r:
            lines.append(f"{variant}: skipped ({r['skip']})")
            continue
        contained = sum(1 for n in ALL_NAMES if n in r["rows"] and not r["rows"][n]["problems"])
        uid = r["rows"].get("__runner__", {}).get("uid")
        lines.append(f"{variant} (trainer uid {uid}): {contained}/{len(ALL_NAMES)} contained")
        assert r["done"] and r["rc"] == 0, f"{variant} runner: exit {r['rc']}\n{r['log']}"
        assert uid == (0 if variant == "root" else (UNPRIV_UID if os.geteuid() == 0 else os.geteuid()))
    print("\n" + "\n".join(lines))
    if all("skip" in r for r in res.values()):
        pytest.skip("; ".join(r["skip"] for r in res.values()))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--run":
        _runner(sys.argv[2])
