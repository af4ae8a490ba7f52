// Runs signal-cli's own D-Bus or JSON-RPC front end over one made-up account, without network.
//
// The tests use it to check our clients and our fake against signal-cli's code: the classes
// that export the D-Bus objects, emit the signals and serialise JSON-RPC are the real ones from
// the signal-cli jars; only the account behind them (org.asamk.signal.manager.Manager) is a
// java.lang.reflect.Proxy that answers from memory. Everything is reached by reflection, so the
// file compiles with any javac >= 17 (`--release 17`) and runs on the Java 21+ signal-cli needs.
//
//   java -cp DIR:signal-cli/lib/* StubDaemon dbus    +NUMBER           (session bus from env)
//   java -cp DIR:signal-cli/lib/* StubDaemon jsonrpc +NUMBER SOCKET    (one client, manual mode)
//
// Standard input takes one command per line:
//   deliver SENDER TIMESTAMP BASE64TEXT   an incoming 1:1 text message from SENDER
//   quit
// Standard output reports, one line each: "ready", and "sent RECIPIENT BASE64TEXT" for every
// message signal-cli asked the account to send. A text starting with "FAIL:identity" or
// "FAIL:unregistered" makes that send fail the way Signal's servers would.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.OutputStreamWriter;
import java.io.PrintStream;
import java.lang.reflect.Constructor;
import java.lang.reflect.InvocationHandler;
import java.lang.reflect.Method;
import java.lang.reflect.Proxy;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.channels.Channels;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Set;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.function.Supplier;

public final class StubDaemon {
    private static final String API = "org.asamk.signal.manager.api.";
    private static final PrintStream OUT = new PrintStream(System.out, true, StandardCharsets.UTF_8);
    private static final List<Object> RECEIVERS = new CopyOnWriteArrayList<>();
    private static long nextSendTimestamp = 1_800_000_000_000L;

    public static void main(String[] args) throws Exception {
        String mode = args[0];
        String number = args[1];
        Object account = stubAccount(number);
        Object accounts = stubAccounts(number, account);
        if (mode.equals("dbus")) {
            Class<?> handlerClass = Class.forName("org.asamk.signal.dbus.DbusHandler");
            Class<?> multi = Class.forName("org.asamk.signal.manager.MultiAccountManager");
            // Arguments: system bus?, bus name, accounts, no receiving until subscribeReceive.
            Object handler = handlerClass
                    .getConstructor(boolean.class, String.class, multi, boolean.class)
                    .newInstance(false, "org.asamk.Signal", accounts, true);
            handlerClass.getMethod("init").invoke(handler);
            OUT.println("ready");
            commands(new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8)));
            handlerClass.getMethod("close").invoke(handler);
        } else {
            Path socketPath = Path.of(args[2]);
            Files.deleteIfExists(socketPath);
            ServerSocketChannel server = ServerSocketChannel.open(StandardProtocolFamily.UNIX);
            server.bind(UnixDomainSocketAddress.of(socketPath));
            Thread control = new Thread(() -> {
                try {
                    commands(new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8)));
                } catch (Exception e) {
                    e.printStackTrace();
                }
                System.exit(0);
            });
            control.setDaemon(true);
            control.start();
            OUT.println("ready");
            try (SocketChannel client = server.accept()) {
                BufferedReader in = new BufferedReader(
                        new InputStreamReader(Channels.newInputStream(client), StandardCharsets.UTF_8));
                OutputStreamWriter out = new OutputStreamWriter(Channels.newOutputStream(client), StandardCharsets.UTF_8);
                Object writer = Class.forName("org.asamk.signal.output.JsonWriterImpl")
                        .getConstructor(java.io.Writer.class).newInstance(out);
                Supplier<String> lines = () -> {
                    try {
                        return in.readLine();
                    } catch (Exception e) {
                        return null;
                    }
                };
                Class<?> dispatcherClass = Class.forName("org.asamk.signal.jsonrpc.SignalJsonRpcDispatcherHandler");
                Class<?> writerType = Class.forName("org.asamk.signal.output.JsonWriter");
                // The last argument is manual receive mode: nothing arrives before subscribeReceive.
                Object dispatcher = dispatcherClass
                        .getConstructor(writerType, Supplier.class, boolean.class)
                        .newInstance(writer, lines, true);
                dispatcherClass
                        .getMethod("handleConnection", Class.forName("org.asamk.signal.manager.MultiAccountManager"))
                        .invoke(dispatcher, accounts);
            }
        }
        System.exit(0);
    }

    private static void commands(BufferedReader in) throws Exception {
        String line;
        while ((line = in.readLine()) != null) {
            String[] words = line.trim().split(" ");
            if (words[0].equals("quit")) {
                return;
            }
            if (words[0].equals("deliver") && words.length == 4) {
                String text = new String(Base64.getDecoder().decode(words[3]), StandardCharsets.UTF_8);
                deliver(words[1], Long.parseLong(words[2]), text);
            } else {
                System.err.println("stub: unknown command " + words[0]);
            }
        }
    }

    private static void deliver(String sender, long timestamp, String text) throws Exception {
        Object source = address(sender);
        Object data = construct("MessageEnvelope$Data", timestamp, Optional.empty(), Optional.empty(),
                Optional.empty(), Optional.of(text), 0, false, false, false, false, false,
                Optional.empty(), Optional.empty(), Optional.empty(), List.of(), Optional.empty(),
                Optional.empty(), List.of(), List.of(), List.of(), List.of());
        Object envelope = construct("MessageEnvelope", Optional.of(source), 1, timestamp, timestamp + 5,
                timestamp + 9, false, Optional.empty(), Optional.empty(), Optional.of(data),
                Optional.empty(), Optional.empty(), Optional.empty(), Optional.empty());
        Method handle = Class.forName("org.asamk.signal.manager.Manager$ReceiveMessageHandler")
                .getMethod("handleMessage", Class.forName(API + "MessageEnvelope"), Throwable.class);
        for (Object receiver : RECEIVERS) {
            handle.invoke(receiver, envelope, null);
        }
        System.err.println("stub: delivered to " + RECEIVERS.size() + " receiver(s)");
    }

    /**
     * A sender as signal-cli knows it: an ACI always (a made-up one derived from the number),
     * plus the phone number when it is given rather than hidden.
     */
    private static Object address(String who) throws Exception {
        boolean isNumber = who.startsWith("+");
        String aci = isNumber ? java.util.UUID.nameUUIDFromBytes(who.getBytes(StandardCharsets.UTF_8)).toString() : who;
        return construct("RecipientAddress", Optional.of(aci), Optional.empty(),
                isNumber ? Optional.of(who) : Optional.empty(), Optional.empty());
    }

    private static Object stubAccount(String number) throws Exception {
        Class<?> managerType = Class.forName("org.asamk.signal.manager.Manager");
        InvocationHandler answer = (proxy, method, args) -> {
            switch (method.getName()) {
                case "getSelfNumber":
                    return number;
                case "toString":
                    return "StubAccount(" + number + ")";
                case "hashCode":
                    return System.identityHashCode(proxy);
                case "equals":
                    return proxy == args[0];
                case "addReceiveHandler":
                    RECEIVERS.add(args[0]);
                    System.err.println("stub: receiver added (" + RECEIVERS.size() + ")");
                    return null;
                case "removeReceiveHandler":
                    RECEIVERS.remove(args[0]);
                    System.err.println("stub: receiver removed (" + RECEIVERS.size() + ")");
                    return null;
                case "getConfiguration":
                    return construct("Configuration", Optional.of(false), Optional.of(false),
                            Optional.of(false), Optional.of(false));
                case "sendMessage":
                    return send(args);
                default:
                    return nothing(method.getReturnType());
            }
        };
        return Proxy.newProxyInstance(StubDaemon.class.getClassLoader(), new Class<?>[] {managerType}, answer);
    }

    private static Object send(Object[] args) throws Exception {
        String text = (String) args[0].getClass().getMethod("messageText").invoke(args[0]);
        Collection<?> recipients = (Collection<?>) args[1];
        Map<Object, List<Object>> results = new LinkedHashMap<>();
        for (Object recipient : recipients) {
            String id = (String) recipient.getClass().getMethod("getIdentifier").invoke(recipient);
            OUT.println("sent " + id + " " + Base64.getEncoder().encodeToString(text.getBytes(StandardCharsets.UTF_8)));
            boolean unregistered = text.startsWith("FAIL:unregistered");
            boolean untrusted = text.startsWith("FAIL:identity");
            Object result = construct("SendMessageResult", address(id), !(unregistered || untrusted),
                    false, unregistered, untrusted, false, null, false);
            results.put(recipient, List.of(result));
        }
        return construct("SendMessageResults", nextSendTimestamp++, results);
    }

    private static Object stubAccounts(String number, Object account) throws Exception {
        Class<?> type = Class.forName("org.asamk.signal.manager.MultiAccountManager");
        InvocationHandler answer = (proxy, method, args) -> {
            switch (method.getName()) {
                case "getAccountNumbers":
                    return List.of(number);
                case "getManagers":
                    return List.of(account);
                case "getManager":
                    return number.equals(args[0]) ? account : null;
                case "toString":
                    return "StubAccounts";
                case "hashCode":
                    return 7;
                case "equals":
                    return proxy == args[0];
                default:
                    return nothing(method.getReturnType());
            }
        };
        return Proxy.newProxyInstance(StubDaemon.class.getClassLoader(), new Class<?>[] {type}, answer);
    }

    private static Object nothing(Class<?> type) {
        if (type == boolean.class) {
            return false;
        }
        if (type == int.class) {
            return 0;
        }
        if (type == long.class) {
            return 0L;
        }
        if (List.class.isAssignableFrom(type) || Collection.class.isAssignableFrom(type)) {
            return new ArrayList<>();
        }
        if (Set.class.isAssignableFrom(type)) {
            return Set.of();
        }
        if (Map.class.isAssignableFrom(type)) {
            return Map.of();
        }
        if (type == Optional.class) {
            return Optional.empty();
        }
        return null;
    }

    /** Calls the public constructor of an API record whose parameter count matches. */
    private static Object construct(String simpleName, Object... values) throws Exception {
        for (Constructor<?> constructor : Class.forName(API + simpleName).getConstructors()) {
            if (constructor.getParameterCount() == values.length && fits(constructor.getParameterTypes(), values)) {
                return constructor.newInstance(values);
            }
        }
        throw new IllegalStateException("no constructor of " + simpleName + " takes " + values.length + " values");
    }

    private static boolean fits(Class<?>[] types, Object[] values) {
        for (int i = 0; i < types.length; i++) {
            if (values[i] == null) {
                if (types[i].isPrimitive()) {
                    return false;
                }
                continue;
            }
            Class<?> type = types[i];
            if (type.isPrimitive()) {
                type = type == int.class ? Integer.class : type == long.class ? Long.class : Boolean.class;
            }
            if (!type.isInstance(values[i])) {
                return false;
            }
        }
        return true;
    }
}
