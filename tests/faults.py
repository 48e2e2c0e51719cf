"""Fault injection for worker processes, installed by a test (never by a normal run).

A test starts workers with `fault_env(point, action, **match)` in their environment (several combined with
`faults_env`): train.py then calls `install`, which hooks the named points (recovery/hooks.py) and acts where
every given field matches (a key ending in _in: the value is one of a list), each fault once: "kill" is
SIGKILL, "stop" is SIGSTOP (the test sends SIGCONT), "raise" raises RuntimeError.
"""
import json
import os
import signal

ENV = "FLOTILLA_FAULT"


def fault_env(point: str, action: str = "kill", **match) -> dict:
    return faults_env({"point": point, "action": action, **match})


def faults_env(*specs: dict) -> dict:
    return {"FLOTILLA_HOOKS": "tests.faults:install", ENV: json.dumps(list(specs))}


def matches(spec: dict, where: dict) -> bool:
    for key, want in spec.items():
        have = where.get(key.removesuffix("_in"))
        if (key.endswith("_in") and have not in want) or (not key.endswith("_in") and have != want):
            return False
    return True


def install(register) -> None:
    pending = json.loads(os.environ[ENV])

    def hook(at: str, where: dict) -> None:
        for spec in list(pending):
            match = {k: v for k, v in spec.items() if k not in ("point", "action")}
            if spec["point"] != at or not matches(match, where):
                continue
            pending.remove(spec)
            if spec["action"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif spec["action"] == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                raise RuntimeError(f"injected fault at {at} {where}")

    register(hook)
