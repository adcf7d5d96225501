"""The experiment config system: recipes, the typed spec, checks, identity.

================  ==========================================================
module            concern
================  ==========================================================
``recipe``        the shared defaults every ``configs/*.py`` file starts from
``files``         loading ``configs/<name>.py[:arg]`` by path
``spec``          the ConfigDict resolved once into typed, frozen parts
``checks``        a whole config checked before anything touches disk
``identity``      which fields make two configs the same run (resume)
================  ==========================================================
"""
