"""Browsing env over an offline web: a local aiohttp site (pages, BM25 search) and ``BrowseEnv``
(envs.browse.env, registered as ``browse-v0``). Modules: world (the shipped seeded encyclopaedia and
its questions), corpus (loading corpora and question sets), web (the site and its search), score
(EM / F1), env (the ToolEnv)."""
