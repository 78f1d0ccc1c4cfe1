"""The task-side library: what runs inside a native task's process (attaching to machd,
its traps over the typed wire, applying its mappings, its threads). Never imported by
machd."""
