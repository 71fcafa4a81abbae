# Configures the freshly bootstrapped root filesystem. Runs as root inside
# `chroot <rootfs> /bin/sh -eu`, in a private mount namespace, with nothing mounted.
# Part of the `base` recipe: changing this text changes the recipe hash.

# The unprivileged user `user` (uid/gid 1000, home /home/user, bash), in group sudo,
# with passwordless sudo, as in E2B's sandboxes.
groupadd --gid 1000 user
useradd --uid 1000 --gid 1000 --groups sudo --create-home --home-dir /home/user \
    --shell /bin/bash --comment user user

cat > /etc/sudoers.d/user <<'SUDOERS'
# Managed by cubicle: the sandbox user may run anything as root without a password.
user ALL=(ALL:ALL) NOPASSWD: ALL
SUDOERS
chmod 0440 /etc/sudoers.d/user
if [ -x /usr/sbin/visudo ]; then
    /usr/sbin/visudo -c -q -f /etc/sudoers.d/user
fi

# Host identity: debootstrap copied the build host's files; replace them. The runtime
# sets the real host name of each sandbox.
echo sandbox > /etc/hostname
cat > /etc/hosts <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	sandbox
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
HOSTS
# No host DNS configuration in the template; the runtime provides one per sandbox.
rm -f /etc/resolv.conf
echo '# provided by cubicle when a sandbox starts' > /etc/resolv.conf

echo "configured user 'user' (uid 1000) with passwordless sudo"
