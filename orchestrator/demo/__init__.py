"""The built-in demo: a synthetic face data set in the competition layout (``data``) and ``make demo``
(``run``: demo data -> search -> ensemble -> score). Everything comes from the product itself, offline."""
