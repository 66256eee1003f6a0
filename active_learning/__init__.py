"""Active learning for atomforge: the campaign loop, campaign state on disk, the label journal
and the ``al`` CLI commands (registered through the commands hook). Reaches plugins only through
the registry. (The campaign loop is tracked by the active-learning issue.)"""
