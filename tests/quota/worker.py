"""A process that saves and loads through a cache with limits (run by the quota tests).

Usage: python worker.py CONFIG_JSON ACTION ARGS_JSON; prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

from fleche_remote import Call
from fleche_remote.config import cache_from_config


def main() -> None:
    cfg, action, args = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    cache = cache_from_config(cfg)
    out: dict = {}
    if action == "fill":
        # save entries of `size` bytes; after each, measure what the cache holds
        peak = 0
        for i in range(args["start"], args["start"] + args["count"]):
            cache.save(Call(args.get("name", "f"), {"i": i}, os.urandom(args["size"])))
            if args.get("keep") is not None:  # an entry in use: loaded between saves
                cache.load_value(Call("f", {"i": args["keep"]}).key())
            if args.get("measure", True):
                peak = max(peak, cache.usage().bytes)
            time.sleep(args.get("pause", 0.0))
        out = {"peak": peak, "calls": cache.usage().calls}
    elif action == "loads":
        # load the given keys in a loop until `seconds` pass; report what was missing
        missing = set()
        end = time.time() + args["seconds"]
        while time.time() < end:
            for i in args["keys"]:
                key = Call("f", {"i": i}).key()
                try:
                    cache.load_value(key)
                except KeyError:
                    missing.add(i)
            time.sleep(0.01)
        out = {"missing": sorted(missing)}
    cache.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
