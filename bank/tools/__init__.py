"""Tools that drive a real bank server from outside: ``bench`` (load), ``chaos`` (crashes),
and the ``launcher`` that starts a server process for them and for the tests.

They live beside the server's modules, not among them (as h11 keeps ``bench/`` and trio
``_tools/``), so nothing the server imports depends on them.
"""
