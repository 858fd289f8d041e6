"""Model lifecycle, offline: train the graph encoder on the knowledge graph (``train``),
evaluate it on a temporal split (``evaluate``, ``ranking``), read graphs for it
(``dataset``), and serve candidates from the vectors (``candidates``); ``commands`` holds the
``kg-streamer`` sub-commands."""
