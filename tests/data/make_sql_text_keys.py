"""How sql_text_keys.db was made, by fleche-remote at commit 06df40d, when
keys were stored as 64-character text: ``python make_sql_text_keys.py
sql_text_keys.db``. Kept to show what the fixture holds; it is not run."""

import sqlite3
import sys

from fleche_remote import Cache, Call
from fleche_remote.storage.claims import Holder
from fleche_remote.storage.sql.stores import SqlCallStore, SqlValueStore

path = sys.argv[1]
url = f"sqlite:///{path}"
calls = SqlCallStore(url)
values = SqlValueStore(url)
cache = Cache(values, calls)
keys = []
for i in range(40):
    call = Call("old.f", {"i": i, "tag": "x" * (i % 3)}, [float(i)] * (i % 7), metadata={"n": i})
    keys.append(cache.save(call))
keys.append(cache.save(Call("old.big", {"n": 1}, b"z" * 5000)))
keys.append(cache.save(Call("old.same", {"a": 1}, 7)))
keys.append(cache.save(Call("old.same", {"a": 2}, 7)))  # one value, two records
calls.touch({keys[0]: 2e9, keys[1]: 2e9})
calls._make_keeper().claim([keys[2]], Holder("owner-1", "host", 1), 1e9)
cache.close()
conn = sqlite3.connect(path)
conn.execute("PRAGMA journal_mode=DELETE")
conn.execute("VACUUM")
conn.close()
print(len(keys))
