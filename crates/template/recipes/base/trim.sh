# Removes what sandboxes do not need and keeps later `apt-get install`s trimmed.
# Runs as root inside `chroot <rootfs> /bin/sh -eu`, in a private mount namespace.
# Part of the `base` recipe: changing this text changes the recipe hash.

mkdir -p /etc/dpkg/dpkg.cfg.d
cat > /etc/dpkg/dpkg.cfg.d/cubicle-trim <<'DPKG'
# Managed by cubicle: do not install documentation, manuals or translations.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
DPKG

apt-get clean
rm -rf /var/lib/apt/lists/*
find /usr/share/doc -mindepth 1 ! -type d ! -regex '/usr/share/doc/[^/]*/copyright' -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/locale/* \
    /usr/share/groff/* /usr/share/lintian/* /usr/share/linda/*
rm -f /var/cache/debconf/*-old /var/lib/dpkg/*-old
find /var/log -mindepth 1 ! -type d -delete
rm -rf /tmp/* /var/tmp/* /root/.cache

echo "trimmed documentation, manuals, translations, apt lists and logs"
