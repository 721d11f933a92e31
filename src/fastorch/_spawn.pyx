# cython: language_level=3
"""``posix_spawn`` with a working-directory action: the fast path of
``fastorch.process``.

Python 3.11's ``os.posix_spawn`` has no chdir action, so every service
with its own ``cwd`` (all of them, once the config resolves paths) would
fall back to fork+exec through ``subprocess``. glibc (2.29 and newer)
offers ``posix_spawn_file_actions_addchdir_np``; with it the child is
started by ``clone(CLONE_VM | CLONE_VFORK)`` and a failed chdir or exec
comes back as the return value.
"""

from libc.stdlib cimport free, malloc
from posix.signal cimport sigemptyset, sigfillset, sigset_t
from posix.types cimport mode_t, pid_t

cdef extern from "<fcntl.h>" nogil:
    enum:
        O_RDONLY
        O_WRONLY

cdef extern from "<spawn.h>" nogil:
    ctypedef struct posix_spawn_file_actions_t:
        pass
    ctypedef struct posix_spawnattr_t:
        pass
    enum:
        POSIX_SPAWN_SETSID
        POSIX_SPAWN_SETSIGMASK
        POSIX_SPAWN_SETSIGDEF
    int posix_spawn(pid_t* pid, const char* path,
                    const posix_spawn_file_actions_t* actions,
                    const posix_spawnattr_t* attr,
                    char* const* argv, char* const* envp)
    int posix_spawn_file_actions_init(posix_spawn_file_actions_t* a)
    int posix_spawn_file_actions_destroy(posix_spawn_file_actions_t* a)
    int posix_spawn_file_actions_adddup2(posix_spawn_file_actions_t* a,
                                         int fd, int newfd)
    int posix_spawn_file_actions_addopen(posix_spawn_file_actions_t* a,
                                         int fd, const char* path,
                                         int oflag, mode_t mode)
    int posix_spawn_file_actions_addchdir_np(
        posix_spawn_file_actions_t* a, const char* path)
    int posix_spawnattr_init(posix_spawnattr_t* attr)
    int posix_spawnattr_destroy(posix_spawnattr_t* attr)
    int posix_spawnattr_setflags(posix_spawnattr_t* attr, short flags)
    int posix_spawnattr_setsigmask(posix_spawnattr_t* attr,
                                   const sigset_t* mask)
    int posix_spawnattr_setsigdefault(posix_spawnattr_t* attr,
                                      const sigset_t* mask)

INHERIT = -1
DEVNULL = -2


cdef char** _vector(list items) except NULL:
    """A NULL-terminated char* array borrowing from ``items`` (bytes).

    NB: the array points into the bytes objects; the caller keeps the
    list alive until posix_spawn has returned.
    """
    cdef Py_ssize_t n = len(items), i
    cdef char** out = <char**>malloc((n + 1) * sizeof(char*))
    if out == NULL:
        raise MemoryError()
    for i in range(n):
        out[i] = <bytes>items[i]
    out[n] = NULL
    return out


def spawn(bytes path, list argv, list envp, bytes cwd, int stdin,
          int stdout, int stderr):
    """Start ``path`` in a new session; returns the pid.

    Args:
        argv, envp: lists of bytes (``envp`` entries are ``KEY=VALUE``).
        cwd: the working directory, or None to keep ours.
        stdin, stdout, stderr: an fd for the child, ``INHERIT`` or
            ``DEVNULL``.

    Every signal is reset to its default and none is blocked in the
    child: the supervisor ignores SIGPIPE, and an ignored disposition
    would otherwise survive exec.

    Raises:
        OSError: the chdir, an open or the exec failed (nothing runs).
    """
    cdef posix_spawn_file_actions_t actions
    cdef posix_spawnattr_t attr
    cdef sigset_t empty, full
    cdef pid_t pid = 0
    cdef int rc = 0, target, fd
    cdef char** c_argv = _vector(argv)
    cdef char** c_envp = NULL
    cdef const char* c_path = path
    try:
        c_envp = _vector(envp)
        posix_spawn_file_actions_init(&actions)
        posix_spawnattr_init(&attr)
        try:
            for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
                if fd == DEVNULL:
                    rc = posix_spawn_file_actions_addopen(
                        &actions, target, b"/dev/null",
                        O_RDONLY if target == 0 else O_WRONLY, 0)
                elif fd >= 0 and fd != target:
                    rc = posix_spawn_file_actions_adddup2(&actions, fd, target)
                if rc:
                    raise OSError(rc, "posix_spawn file action")
            if cwd is not None:
                rc = posix_spawn_file_actions_addchdir_np(&actions, cwd)
                if rc:
                    raise OSError(rc, "posix_spawn chdir action")
            sigemptyset(&empty)
            sigfillset(&full)
            posix_spawnattr_setsigmask(&attr, &empty)
            posix_spawnattr_setsigdefault(&attr, &full)
            posix_spawnattr_setflags(
                &attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK
                | POSIX_SPAWN_SETSIGDEF)
            with nogil:
                rc = posix_spawn(&pid, c_path, &actions, &attr, c_argv, c_envp)
            if rc:
                raise OSError(rc, _strerror(rc))
            return pid
        finally:
            posix_spawn_file_actions_destroy(&actions)
            posix_spawnattr_destroy(&attr)
    finally:
        free(c_argv)
        free(c_envp)


def _strerror(int code):
    import os
    return os.strerror(code)
