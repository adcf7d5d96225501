"""The experiment config system: the schema, recipes, checks, identity.

================  ==========================================================
module            concern
================  ==========================================================
``schema``        how a field is declared; defaults, rules, parts from it
``spec``          every field, declared once; the ConfigDict resolved into parts
``recipe``        the shared values every ``configs/*.py`` file starts from
``files``         loading ``configs/<name>.py[:arg]`` by path
``checks``        a whole config checked before anything touches disk
``identity``      which fields make two configs the same run (resume)
``reference``     docs/config.md rendered from the schema
================  ==========================================================
"""
