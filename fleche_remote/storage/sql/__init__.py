"""The SQL family of stores: ``stores`` (the value and call stores), on the
small DB-API layer of ``db`` (statements, transactions), with one engine
module each (``sqlite``: the standard library's sqlite3; ``postgres``:
psycopg) and ``rows`` (records to and from table rows). Importing this
package imports neither driver.
"""
