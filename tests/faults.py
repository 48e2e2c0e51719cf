"""Fault injection for worker processes, installed by a test (never by a normal run).

A test starts workers with `fault_env(point, action, **match)` in their environment: train.py then calls
`install`, which hooks the named point (recovery/hooks.py) and acts there when every given field matches,
once: "kill" is SIGKILL, "stop" is SIGSTOP (the test sends SIGCONT), "raise" raises RuntimeError.
"""
import json
import os
import signal

ENV = "FLOTILLA_FAULT"


def fault_env(point: str, action: str = "kill", **match) -> dict:
    return {"FLOTILLA_HOOKS": "tests.faults:install", ENV: json.dumps({"point": point, "action": action, **match})}


def install(register) -> None:
    spec = json.loads(os.environ[ENV])
    point, action = spec.pop("point"), spec.pop("action")
    fired = []

    def hook(at: str, where: dict) -> None:
        if fired or at != point:
            return
        for key, want in spec.items():
            have = where.get(key.removesuffix("_in"))
            if (key.endswith("_in") and have not in want) or (not key.endswith("_in") and have != want):
                return
        fired.append(at)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            raise RuntimeError(f"injected fault at {at} {where}")

    register(hook)
