# Removes what sandboxes do not need from the code-interpreter layer. Runs as root
# inside `chroot <overlay> /bin/sh -eu`, in private mount and pid namespaces. The parent's
# dpkg excludes already kept documentation, manuals and translations out. Only what this
# build added is removed: deleting a file of the parent's layers would put a whiteout into
# this one.
# Part of the `code-interpreter` recipe: changing this text changes the recipe hash.

apt-get clean
rm -rf /var/lib/apt/lists/*
find /usr/share/doc -mindepth 1 ! -type d ! -regex '/usr/share/doc/[^/]*/copyright' -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
rm -f /var/cache/debconf/*-old /var/lib/dpkg/*-old
find /var/log -mindepth 1 ! -type d -delete
rm -rf /tmp/* /var/tmp/*

# The test suites of numpy, pandas, scipy, sklearn, sympy, matplotlib...: about 160 MB
# (with their .pyc files) that no import needs. Deleted rather than excluded through dpkg:
# Debian's postinst scripts byte-compile every file their package lists and fail on
# missing ones.
find /usr/lib/python3/dist-packages -mindepth 2 -type d -name tests -prune \
    -exec rm -rf {} +

echo "trimmed apt lists, caches, logs and Python test suites"
