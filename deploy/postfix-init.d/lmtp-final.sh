# boky/postfix runs /docker-init.d/*.sh before Postfix starts: its main.cf comes from POSTFIX_*
# variables, master.cf from nothing, so this sets flags=X on the lmtp transport: the bridge
# delivers finally, success notices say "delivered", not "relayed" (Postfix >= 3.5).
postconf -F -e 'lmtp/unix/command = lmtp flags=X'
