"""Tools for a laptop and the tests, never imported by the runtime: the embedded broker and
graph DB (``local_services``, ``arcadedb_server``), the public data sets as events
(``datasets``), synthetic graphs (``synth``) and the demo."""
