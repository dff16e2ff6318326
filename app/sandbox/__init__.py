"""Wall 2: code that comes from an upload runs only in a fresh, locked-down process.

Every step that touches an uploaded program (load, re-export, compile, run the compiled
code, package) runs in ``app.sandbox.child`` inside bubblewrap (``profile.py``): not
root, no capabilities, no_new_privs, a seccomp filter, its own PID, network, IPC and
mount namespaces, a read-only view of the system with one writable scratch dir, a
scrubbed environment and finite rlimits. Each job gets a process of its own that has
never seen another job's data (``process.py`` keeps one pre-warmed per worker slot).
The trusted supervisor (``app.worker``) holds the DB and storage, and only reads what
the child leaves in its scratch dir.
"""

from __future__ import annotations

